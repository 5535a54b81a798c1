"""Hostile inputs to the other commands: `validate` (manifests, eval text, flags), `report` (validate
records and baselines), `sweep`, `chat`, `fixture` and `recipes show`.

Same contract as every catalogue row (reliability_harness.check_case): the exit status, one
``error:`` line naming the file or flag, no traceback, nothing at --out or beside it, the inputs
unchanged. A positive control per command family runs the harness on good input.
"""

from __future__ import annotations

import json

import pytest
from reliability_harness import (
    BILLION_LAUGHS,
    PYTHON_APPLY,
    Case,
    Workspace,
    cases_by_id,
    check_case,
    deep_json,
    diff,
    edit_json,
    leftovers,
    run_cli,
    snapshot,
    write_json,
)

VAL = ("validate", "{src}", "--reference", "{ckpt}", "--no-speed", "--quiet", "--cache-dir", "{cache}")
REP = ("report", "{records}", "--out", "{out}")
SWEEP = ("sweep", "--checkpoint", "{ckpt}", "--method", "rtn", "--block-size", "32", "--no-speed", "--quiet")
FIX = ("fixture", "--recipe", "phi-3-mini-4k", "--out", "{out}", "--quiet")
MANIFEST = "manifest.json"

# A record with the required fields only (a hand-written or older result).
MINIMAL_RECORD = {"artifact": "phi-3-mini-4k-rtn-w4g32s-onnx-cpu", "provider": "cpu", "status": "ok"}


def text_file(content, name: str):
    """Setup: {in}/NAME holds ``content`` (text, bytes, or a JSON document)."""
    def setup(ws: Workspace) -> None:
        path = ws.inp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            write_json(path, content)
    return setup


def records(change):
    """Setup: the real validate result at {records}, changed by ``change(doc)``."""
    return lambda ws: edit_json(ws.records, change)


def first_record(**fields):
    return records(lambda doc: doc["records"][0].update(fields))


def records_text(raw: str | bytes):
    return lambda ws: ws.records.write_bytes(raw if isinstance(raw, bytes) else raw.encode())


def src_manifest(change):
    return lambda ws: edit_json(ws.src / MANIFEST, change)


def _cpu(doc: dict) -> dict:
    return next(a for a in doc["artifacts"] if a.get("target") == "cpu")


def _artifact_outside(ws: Workspace) -> None:
    import shutil

    shutil.copytree(ws.src / "onnx-cpu", ws.inp / "outside")
    edit_json(ws.src / MANIFEST, lambda d: _cpu(d).update(path="../outside"))


VALIDATE = [
    Case("validate-no-manifest", ("validate", "{ckpt}", *VAL[2:]), MANIFEST),
    Case("validate-reference-missing", ("validate", "{src}", "--reference", "{in}/nope", "--no-speed", "--quiet"), "{in}/nope"),
    Case("validate-reference-not-a-checkpoint", ("validate", "{src}", "--reference", "{src}", "--no-speed", "--quiet",
                                                 "--cache-dir", "{cache}"), "config.json"),
    Case("validate-manifest-not-json", VAL, MANIFEST, setup=lambda ws: (ws.src / MANIFEST).write_text("{")),
    Case("validate-manifest-nesting-bomb", VAL, MANIFEST, setup=lambda ws: (ws.src / MANIFEST).write_text(deep_json())),
    Case("validate-artifact-without-name", VAL, MANIFEST, setup=src_manifest(lambda d: [a.pop("name") for a in d["artifacts"]])),
    Case("validate-artifact-path-outside", VAL, MANIFEST, setup=_artifact_outside),
    Case("validate-eval-text-missing", VAL + ("--eval-text", "{in}/nope.txt"), "nope.txt"),
    Case("validate-eval-text-empty", VAL + ("--eval-text", "{in}/eval.txt"), "eval.txt", setup=text_file("", "eval.txt")),
    Case("validate-eval-text-not-utf8", VAL + ("--eval-text", "{in}/eval.txt"), "eval.txt",
         setup=text_file(b"\xff\xfe" * 2000, "eval.txt")),
    Case("validate-window-zero", VAL + ("--window", "0"), "--window"),
    Case("validate-window-negative", VAL + ("--window", "-512"), "--window"),
    Case("validate-stride-zero", VAL + ("--stride", "0"), "--stride"),
    Case("validate-prompt-lengths-not-numbers", VAL + ("--prompt-lengths", "128,abc"), "--prompt-lengths"),
    Case("validate-providers-unknown", VAL + ("--providers", "cpu,gpu"), "--providers"),
    Case("validate-threads-negative", VAL + ("--threads", "-4"), "--threads"),
]

REPORT = [
    Case("report-records-missing", ("report", "{in}/nope.json", "--out", "{out}"), "nope.json"),
    Case("report-records-not-json", REP, "r.json", setup=records_text("{")),
    Case("report-records-not-utf8", REP, "r.json", setup=records_text(b'{"records": ["\xff"]}')),
    Case("report-records-a-list", REP, "r.json", setup=records(lambda doc: doc["records"])),
    Case("report-records-nesting-bomb", REP, "r.json", setup=records_text(deep_json())),
    Case("report-records-schema-unknown", REP, "r.json", setup=records(lambda doc: doc.update(schema_version=99))),
    Case("report-record-not-an-object", REP, "r.json", setup=records(lambda doc: doc.update(records=[1]))),
    Case("report-record-accuracy-a-string", REP, "r.json", setup=first_record(accuracy="high")),
    Case("report-record-size-a-string", REP, "r.json", setup=first_record(size_bytes="big")),
    Case("report-record-speed-length-not-a-number", REP, "r.json",
         setup=first_record(speed={"abc": {"prefill_tokens_per_s": {"median": 1.0}}})),
    Case("report-record-artifact-not-a-string", REP, "r.json", setup=first_record(artifact=["a"])),
    Case("report-record-reference-a-list", REP, "r.json", setup=first_record(reference=[1, 2])),
    Case("report-baseline-not-json", REP + ("--baseline", "{in}/b.json"), "b.json", setup=text_file("{", "b.json")),
    Case("report-baseline-record-garbage", REP + ("--baseline", "{in}/b.json"), "b.json",
         setup=text_file({"schema_version": 1, "records": [{**MINIMAL_RECORD, "accuracy": [1, 2]}]}, "b.json")),
    Case("report-out-foreign-folder", REP, "{out}",
         setup=lambda ws: (ws.out.mkdir(), (ws.out / "notes.txt").write_text("precious"))),
    Case("report-out-is-a-file", REP, "{out}", setup=lambda ws: ws.out.write_text("precious")),
    Case("report-threshold-negative", REP + ("--max-kld-increase", "-1"), "--max-kld-increase"),
    Case("report-threshold-nan", REP + ("--max-kld-increase", "nan"), "--max-kld-increase"),
]

SWEEP_CASES = [
    Case("sweep-block-size-not-numbers", ("sweep", "--checkpoint", "{ckpt}", "--out", "{out}", "--block-size", "32,abc"),
         "--block-size"),
    Case("sweep-method-unknown", ("sweep", "--checkpoint", "{ckpt}", "--out", "{out}", "--method", "rtn,nope"), "--method"),
    Case("sweep-block-size-invalid", SWEEP[:6] + ("48", "--no-speed", "--quiet", "--out", "{out}"), "--block-size"),
    Case("sweep-out-is-a-file", SWEEP + ("--out", "{out}",), "{out}", setup=lambda ws: ws.out.write_text("precious")),
    Case("sweep-out-inside-checkpoint", SWEEP + ("--out", "{ckpt}/sweep"), ("--out", "{ckpt}/sweep"),
         notes="a sweep must not write into its own input"),
]

CHAT = [
    Case("chat-artifact-missing", ("chat", "{in}/nope", "--prompt", "hi"), "{in}/nope"),
    Case("chat-not-an-artifact", ("chat", "{ckpt}", "--prompt", "hi"), ("genai_config.json", "{ckpt}")),
    Case("chat-genai-config-not-json", ("chat", "{src}/onnx-cpu", "--prompt", "hi"), "genai_config.json",
         setup=lambda ws: (ws.src / "onnx-cpu" / "genai_config.json").write_text("{")),
    Case("chat-max-new-tokens-zero", ("chat", "{src}/onnx-cpu", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens"),
    Case("chat-max-new-tokens-negative", ("chat", "{src}/onnx-cpu", "--prompt", "hi", "--max-new-tokens", "-1"),
         "--max-new-tokens"),
    Case("chat-out-folder-empty-stdin", ("chat", "{src}"), ("--prompt", "stdin"),
         notes="the `chat: using ...` note is a second stderr line"),
]

FIXTURE = [
    Case("fixture-no-recipe", ("fixture", "--out", "{out}", "--quiet"), "--recipe"),
    Case("fixture-layers-zero", FIX + ("--layers", "0"), "--layers"),
    Case("fixture-layers-negative", FIX + ("--layers", "-2"), "--layers"),
    Case("fixture-hidden-zero", FIX + ("--hidden", "0"), "--hidden"),
    Case("fixture-hidden-not-divisible", FIX + ("--hidden", "100"), "--hidden"),
    Case("fixture-train-steps-negative", FIX + ("--train-steps", "-5"), "--train-steps"),
    Case("fixture-full-size-without-random", FIX + ("--full-size",), "--random"),
    Case("fixture-recipe-python-tag", ("fixture", "--recipe", "{in}/r.yaml", "--out", "{out}", "--quiet"), "r.yaml",
         setup=text_file(PYTHON_APPLY, "r.yaml")),
    Case("fixture-out-foreign-folder-force", FIX + ("--force",), "{out}",
         setup=lambda ws: (ws.out.mkdir(), (ws.out / "notes.txt").write_text("precious"))),
]

RECIPES = [
    Case("recipes-show-unknown-name", ("recipes", "show", "phi-9"), "phi-9"),
    Case("recipes-show-python-tag", ("recipes", "show", "{in}/r.yaml"), "r.yaml", setup=text_file(PYTHON_APPLY, "r.yaml")),
    Case("recipes-show-billion-laughs", ("recipes", "show", "{in}/r.yaml"), "r.yaml", setup=text_file(BILLION_LAUGHS, "r.yaml")),
    Case("recipes-show-nesting-bomb", ("recipes", "show", "{in}/r.yaml"), "r.yaml", setup=text_file(deep_json(5_000), "r.yaml")),
    Case("recipes-show-a-folder", ("recipes", "show", "{in}/r.yaml"), "r.yaml", setup=lambda ws: (ws.inp / "r.yaml").mkdir()),
]

ALL = VALIDATE + REPORT + SWEEP_CASES + CHAT + FIXTURE + RECIPES


@pytest.mark.parametrize("case", **cases_by_id(ALL))
def test_hostile_command_input(case: Case, workspace: Workspace):
    check_case(case, workspace)


def test_report_positive_control(workspace: Workspace):
    """The validate result every report row above damages makes a report: exit 0, the files, nothing else left."""
    run = run_cli(workspace.args(REP), cwd=workspace.root, home=workspace.home)
    assert run.returncode == 0, run.describe()
    assert {"report.json", "report.md", "report.html"} <= {p.name for p in workspace.out.iterdir()}
    assert json.loads((workspace.out / "report.json").read_text())["kind"] == "phi3-export report"
    assert leftovers(workspace.outs) == []


def test_report_minimal_record_is_not_an_internal_error(workspace: Workspace):
    """A record with only artifact/provider/status is either reported or refused as bad input, never a crash."""
    text_file({"schema_version": 1, "records": [MINIMAL_RECORD]}, "r.json")(workspace)
    run = run_cli(workspace.args(("report", "{in}/r.json", "--out", "{out}")), cwd=workspace.root, home=workspace.home)
    assert run.returncode in (0, 2) and "internal error" not in run.stderr and "Traceback" not in run.stderr, run.describe()


def test_validate_chat_positive_control(workspace: Workspace):
    """The undamaged OUT folder validates (accuracy only) and chats; neither touches its inputs."""
    args = workspace.args(VAL + ("--window", "64"))
    before = snapshot(workspace.inp)
    run = run_cli(args, cwd=workspace.root, home=workspace.home)
    assert run.returncode in (0, 1) and "Traceback" not in run.stderr, run.describe()  # 1: a tiny random model may fail a check
    assert "internal error" not in run.stderr, run.describe()
    chat = run_cli(workspace.args(("chat", "{src}/onnx-cpu", "--prompt", "hi", "--max-new-tokens", "2")),
                   cwd=workspace.root, home=workspace.home)
    assert chat.returncode == 0 and "assistant:" in chat.stdout, chat.describe()
    assert not diff(before, snapshot(workspace.inp)), "validate or chat modified its inputs"
