"""Hostile inputs to `quantize`: checkpoint folder, config.json, safetensors header and data, the shard index,
tokenizer files, recipe YAML (bombs, python tags), flags and output paths.

Each row damages a copy of a tiny checkpoint and expects: the exit status, one stderr line
``error: ...`` naming the file or flag, no traceback, nothing at --out or beside it, and the
input folder unchanged (see reliability_harness.check_case). The positive control at the end
runs the same harness on the undamaged checkpoint.
"""

from __future__ import annotations

import os

import pytest
from reliability_harness import (
    BILLION_LAUGHS,
    PYTHON_APPLY,
    PYTHON_NAME,
    Case,
    Workspace,
    cases_by_id,
    check_case,
    deep_json,
    diff,
    edit_json,
    edit_safetensors_header,
    first_tensor,
    leftovers,
    read_safetensors,
    run_cli,
    set_weight_value,
    snapshot,
    write_json,
    write_safetensors,
)

Q = ("quantize", "--checkpoint", "{ckpt}", "--out", "{out}", "--quiet", "--target", "cpu")
AWQ = ("--method", "awq", "--calib-samples", "1", "--calib-seqlen", "16")  # the cheapest calibration
ST, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
WEIGHT = "model.layers.0.mlp.down_proj.weight"


def q(*extra: str) -> tuple[str, ...]:
    return Q + extra


def with_recipe(text: str | bytes):
    """Setup: write recipe file {in}/r.yaml."""
    def setup(ws: Workspace) -> None:
        path = ws.inp / "r.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def config(change):
    return lambda ws: edit_json(ws.ckpt / CONFIG, change)


def config_text(raw: bytes):
    return lambda ws: (ws.ckpt / CONFIG).write_bytes(raw)


def header(change):
    return lambda ws: edit_safetensors_header(ws.ckpt / ST, change)


def _offsets(value):
    def change(h):
        h[first_tensor(h)]["data_offsets"] = value
    return change


def _drop_offsets(h):
    del h[first_tensor(h)]["data_offsets"]


def _shrink_first(h):
    # The first tensor claims 4 bytes fewer than its shape needs: a hole in the data.
    name = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[name]["data_offsets"][1] -= 4


def _sharded(ws: Workspace, weight_map_path) -> None:
    """Turn the single file into an index + a shard; ``weight_map_path(ws)`` is what the index lists."""
    h, _ = read_safetensors(ws.ckpt / ST)
    target = weight_map_path(ws)
    write_json(ws.ckpt / INDEX, {"metadata": {}, "weight_map": {k: target for k in h if k != "__metadata__"}})


def _shard_outside(ws: Workspace) -> str:
    (ws.inp / "outside.safetensors").write_bytes((ws.ckpt / ST).read_bytes())
    (ws.ckpt / ST).unlink()
    return "../outside.safetensors"


def _shard_absolute(ws: Workspace) -> str:
    (ws.inp / "outside.safetensors").write_bytes((ws.ckpt / ST).read_bytes())
    (ws.ckpt / ST).unlink()
    return str(ws.inp / "outside.safetensors")


def _shipped_recipe(ws: Workspace, replace: tuple[str, str]) -> None:
    from phi3_export.recipes import recipes_dir

    text = (recipes_dir() / "phi-3-mini-4k.yaml").read_text()
    assert replace[0] in text
    (ws.inp / "r.yaml").write_text(text.replace(*replace, 1))


CASES = [
    # --- the checkpoint folder ---
    Case("checkpoint-missing", ("quantize", "--checkpoint", "{in}/nope", "--out", "{out}", "--quiet"), "{in}/nope"),
    Case("checkpoint-is-a-file", ("quantize", "--checkpoint", "{in}/file", "--out", "{out}", "--quiet"), "{in}/file",
         setup=lambda ws: (ws.inp / "file").write_text("x")),
    Case("checkpoint-empty-folder", ("quantize", "--checkpoint", "{in}/empty", "--out", "{out}", "--quiet"), CONFIG,
         setup=lambda ws: (ws.inp / "empty").mkdir()),
    Case("pickle-only", q(), "pytorch_model.bin",
         setup=lambda ws: ((ws.ckpt / ST).unlink(), (ws.ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04N."))),
    # --- config.json ---
    Case("config-missing", q(), CONFIG, setup=lambda ws: (ws.ckpt / CONFIG).unlink()),
    Case("config-not-json", q(), CONFIG, setup=config_text(b"{not json")),
    Case("config-json-array", q(), CONFIG, setup=config_text(b"[]")),
    Case("config-not-utf8", q(), CONFIG, setup=config_text(b'{"architectures": ["\xff\xfe"]}')),
    Case("config-nesting-bomb", q(), CONFIG, setup=config_text(deep_json().encode())),
    Case("config-architectures-a-string", q(), CONFIG, setup=config(lambda c: c.update(architectures="Phi3ForCausalLM"))),
    Case("config-unknown-architecture", q(), CONFIG, setup=config(lambda c: c.update(architectures=["EvilForCausalLM"]))),
    Case("config-negative-layers", q(), CONFIG, setup=config(lambda c: c.update(num_hidden_layers=-1))),
    Case("config-layer-count-bomb", q(), CONFIG, setup=config(lambda c: c.update(num_hidden_layers=10**9))),
    Case("config-zero-hidden", q(), CONFIG, setup=config(lambda c: c.update(hidden_size=0))),
    Case("config-vocab-a-string", q(), CONFIG, setup=config(lambda c: c.update(vocab_size="1024"))),
    Case("config-nan-rope-theta", q(), CONFIG,
         setup=config(lambda c: (c.update(rope_theta=float("nan")), c["rope_parameters"].update(rope_theta=float("nan"))))),
    Case("config-heads-not-dividing", q(), CONFIG, setup=config(lambda c: c.update(num_key_value_heads=3))),
    # --- the safetensors header and data ---
    Case("safetensors-empty", q(), ST, setup=lambda ws: (ws.ckpt / ST).write_bytes(b"")),
    Case("safetensors-shorter-than-length", q(), ST, setup=lambda ws: (ws.ckpt / ST).write_bytes(b"\x05\x00\x00")),
    Case("safetensors-header-length-huge", q(), ST,
         setup=lambda ws: write_safetensors(ws.ckpt / ST, b"{}", b"", header_len=2**64 - 1)),
    Case("safetensors-header-not-json", q(), ST, setup=header(lambda h: b"{\"a\": not json}")),
    Case("safetensors-header-a-list", q(), ST, setup=header(lambda h: b"[]")),
    Case("safetensors-header-not-utf8", q(), ST, setup=header(lambda h: b'{"\xff": 1}')),
    Case("safetensors-entry-without-offsets", q(), ST, setup=header(_drop_offsets)),
    Case("safetensors-offsets-strings", q(), ST, setup=header(_offsets(["0", "4"]))),
    Case("safetensors-offsets-past-end", q(), ST, setup=header(_offsets([0, 10**12]))),
    Case("safetensors-offsets-negative", q(), ST, setup=header(_offsets([-8, 4]))),
    Case("safetensors-size-disagrees-with-shape", q(), ST, setup=header(_shrink_first)),
    Case("safetensors-unknown-dtype", q(), ST, setup=header(lambda h: h[WEIGHT].update(dtype="X99"))),
    Case("weights-nan", q(), (ST, WEIGHT), setup=lambda ws: set_weight_value(ws.ckpt / ST, WEIGHT, float("nan"))),
    Case("weights-inf", q(), (ST, WEIGHT), setup=lambda ws: set_weight_value(ws.ckpt / ST, WEIGHT, float("inf"))),
    # --- the shard index ---
    Case("index-not-json", q(), INDEX, setup=lambda ws: (ws.ckpt / INDEX).write_text("{")),
    Case("index-weight-map-a-list", q(), INDEX, setup=lambda ws: write_json(ws.ckpt / INDEX, {"weight_map": [ST]})),
    Case("index-shard-missing", q(), INDEX, setup=lambda ws: _sharded(ws, lambda ws: "model-00001-of-00002.safetensors")),
    Case("index-shard-outside-folder", q(), INDEX, setup=lambda ws: _sharded(ws, _shard_outside)),
    Case("index-shard-absolute-path", q(), INDEX, setup=lambda ws: _sharded(ws, _shard_absolute)),
    # --- tokenizer files ---
    Case("tokenizer-json-not-json", q(), "tokenizer.json", setup=lambda ws: (ws.ckpt / "tokenizer.json").write_text("{")),
    Case("tokenizer-json-a-list", q(), "tokenizer.json", setup=lambda ws: (ws.ckpt / "tokenizer.json").write_text("[]")),
    Case("tokenizer-config-not-json", q(), "tokenizer_config.json",
         setup=lambda ws: (ws.ckpt / "tokenizer_config.json").write_text("{")),
    # --- recipe YAML ---
    Case("recipe-file-missing", q("--recipe", "{in}/nope.yaml"), "nope.yaml"),
    Case("recipe-yaml-syntax", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe("name: [unclosed\n")),
    Case("recipe-billion-laughs", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe(BILLION_LAUGHS)),
    Case("recipe-python-object-apply", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe(PYTHON_APPLY),
         notes="the tag must never run: pwned-by-yaml would appear in the workspace"),
    Case("recipe-python-name", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe(PYTHON_NAME)),
    Case("recipe-a-list", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe("- name: x\n")),
    Case("recipe-empty", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe("")),
    Case("recipe-not-utf8", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe(b"name: \xff\xfe\n")),
    Case("recipe-nul-character", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe("name: \x00\n")),
    Case("recipe-nesting-bomb", q("--recipe", "{in}/r.yaml"), "r.yaml", setup=with_recipe(deep_json(5_000))),
    Case("recipe-unknown-field", q("--recipe", "{in}/r.yaml"), "r.yaml",
         setup=lambda ws: _shipped_recipe(ws, ("symmetric:", "symetric:"))),
    Case("recipe-nan-theta", q("--recipe", "{in}/r.yaml"), "r.yaml",
         setup=lambda ws: _shipped_recipe(ws, ("theta: 10000.0", "theta: .nan"))),
    # --- flags ---
    Case("block-size-not-power-of-two", q("--block-size", "48"), "--block-size"),
    Case("block-size-zero", q("--block-size", "0"), "--block-size"),
    Case("block-size-negative", q("--block-size", "-32"), "--block-size"),
    Case("block-size-huge", q("--block-size", str(2**40)), "--block-size"),
    Case("max-length-zero", q("--max-length", "0"), "--max-length"),
    Case("max-length-negative", q("--max-length", "-1"), "--max-length"),
    Case("max-length-huge", q("--max-length", str(10**12)), "--max-length"),
    Case("target-unknown", q("--target", "cpu,tpu"), ("--target", "tpu")),
    Case("format-unknown", q("--format", "onnx,gif"), "--format"),
    Case("calib-samples-zero", q(*AWQ, "--calib-samples", "0"), "--calib-samples"),
    Case("calib-seqlen-negative", q(*AWQ, "--calib-seqlen", "-5"), "--calib-seqlen"),
    Case("calib-text-missing", q(*AWQ, "--calib-text", "{in}/nope.txt"), ("--calib-text", "nope.txt")),
    Case("calib-text-empty", q(*AWQ, "--calib-text", "{in}/calib.txt"), ("--calib-text", "calib.txt"),
         setup=lambda ws: (ws.inp / "calib.txt").write_text("")),
    Case("bits-not-a-choice", q("--bits", "5"), "--bits", notes="click usage errors are one line too"),
    Case("missing-required-out", ("quantize", "--checkpoint", "{ckpt}", "--quiet"), "--out"),
    # --- output paths ---
    Case("out-is-a-file", q(), "{out}", setup=lambda ws: ws.out.write_text("precious")),
    Case("out-is-a-file-force", q("--force"), "{out}", setup=lambda ws: ws.out.write_text("precious")),
    Case("out-foreign-folder-force", q("--force"), "{out}",
         setup=lambda ws: (ws.out.mkdir(), (ws.out / "thesis.tex").write_text("precious"))),
    Case("out-symlink-to-our-output-force", q("--force"), "{out}",
         setup=lambda ws: ws.out.symlink_to(ws.src, target_is_directory=True)),
    Case("out-parent-is-a-file", ("quantize", "--checkpoint", "{ckpt}", "--out", "{outs}/f/out", "--quiet"), "{outs}/f",
         setup=lambda ws: (ws.outs / "f").write_text("x")),
    Case("out-inside-checkpoint", ("quantize", "--checkpoint", "{ckpt}", "--out", "{ckpt}/out", "--quiet", "--target", "cpu"),
         ("--out", "{ckpt}/out")),
    Case("out-is-the-checkpoint-force",
         ("quantize", "--checkpoint", "{ckpt}", "--out", "{ckpt}", "--force", "--quiet", "--target", "cpu"),
         ("--out", "{ckpt}"), notes="a fixture checkpoint counts as phi3-export output for --force"),
]


@pytest.mark.parametrize("case", **cases_by_id(CASES))
def test_hostile_quantize_input(case: Case, workspace: Workspace):
    check_case(case, workspace)


def test_catalogue_positive_control(workspace: Workspace):
    """The same harness on the undamaged checkpoint: exit 0, the output whole, the input untouched."""
    before = snapshot(workspace.ckpt)
    run = run_cli(workspace.args(Q), cwd=workspace.root, home=workspace.home)
    assert run.returncode == 0, run.describe()
    assert (workspace.out / "manifest.json").is_file() and (workspace.out / "onnx-cpu" / "model.onnx").is_file()
    assert not diff(before, snapshot(workspace.ckpt)), "quantize modified its input"
    assert leftovers(workspace.outs) == [] and sorted(os.listdir(workspace.outs)) == ["out"]
    assert "Traceback" not in run.stderr
