"""Hostile inputs to `package` (a quantize OUT folder and its manifest) and `verify` (a bundle and its manifest).

`package` rows expect what every command promises on bad input: exit 2, one ``error:`` line naming
the file or flag, no traceback, nothing at --out, the source folder unchanged. `verify` is a check,
not a writer: its rows expect exit 1, every problem on a ``problem:`` line (one names the file),
the ``do not ship`` summary, never an internal error, and the bundle unchanged. Both must stay
inside their folder: a manifest entry that points outside it is a problem, never followed.
"""

from __future__ import annotations

import shutil

import pytest
from reliability_harness import (
    LFS_POINTER,
    Case,
    Workspace,
    cases_by_id,
    check_case,
    deep_json,
    diff,
    edit_json,
    leftovers,
    refresh_manifest_files,
    run_cli,
    sha256,
    snapshot,
)

P = ("package", "{src}", "--target", "android", "--out", "{out}")
V = ("verify", "{bundle}")
MANIFEST = "manifest.json"
SECRET = "not part of any bundle\n"


def src_manifest(change):
    return lambda ws: edit_json(ws.src / MANIFEST, change)


def bundle_manifest(change):
    return lambda ws: edit_json(ws.bundle / MANIFEST, change)


def mobile(doc: dict) -> dict:
    return next(a for a in doc["artifacts"] if a.get("target") == "mobile")


def _secret_entry(ws: Workspace, path: str) -> dict:
    """A manifest entry for {in}/secret.txt, correct in size and sha256, reached through ``path``."""
    secret = ws.inp / "secret.txt"
    secret.write_text(SECRET)
    return {"path": path, "size": secret.stat().st_size, "sha256": sha256(secret)}


def _outside_copy(ws: Workspace, folder) -> str:
    """A copy of ``folder`` at {in}/outside, beside (not inside) the folder under test."""
    shutil.copytree(folder, ws.inp / "outside")
    return "../outside"


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _artifact_path_outside(ws: Workspace) -> None:
    path = _outside_copy(ws, ws.src / "onnx-mobile")
    edit_json(ws.src / MANIFEST, lambda d: mobile(d).update(path=path))


def _artifact_path_absolute(ws: Workspace) -> None:
    _outside_copy(ws, ws.src / "onnx-mobile")
    edit_json(ws.src / MANIFEST, lambda d: mobile(d).update(path=str(ws.inp / "outside")))


def _package_file_outside(ws: Workspace) -> None:
    entry = _secret_entry(ws, "../secret.txt")
    edit_json(ws.src / MANIFEST, lambda d: mobile(d)["files"].append(entry))


def _verify_file_outside(ws: Workspace, absolute: bool = False) -> None:
    entry = _secret_entry(ws, str(ws.inp / "secret.txt") if absolute else "../secret.txt")
    edit_json(ws.bundle / MANIFEST, lambda d: d["files"].append(entry))


def _verify_model_outside(ws: Workspace) -> None:
    folder = _outside_copy(ws, ws.bundle / "onnx")
    edit_json(ws.bundle / MANIFEST, lambda d: d["models"][0].update(folder=folder))


def _size_as_string(doc: dict) -> None:
    entry = mobile(doc)["files"][0]
    entry["size"] = str(entry["size"])


def _package_genai_config_empty(ws: Workspace) -> None:
    (ws.src / "onnx-mobile" / "genai_config.json").write_text("{}")
    edit_json(ws.src / MANIFEST, lambda d: refresh_manifest_files(ws.src, mobile(d)["files"]))


def _verify_genai_config_empty(ws: Workspace) -> None:
    (ws.bundle / "onnx" / "genai_config.json").write_text("{}")
    edit_json(ws.bundle / MANIFEST, lambda d: refresh_manifest_files(ws.bundle, d["files"]))


PACKAGE = [
    Case("package-source-missing", ("package", "{in}/nope", "--target", "android", "--out", "{out}"), "{in}/nope"),
    Case("package-manifest-missing", P, MANIFEST, setup=lambda ws: (ws.src / MANIFEST).unlink()),
    Case("package-manifest-not-json", P, MANIFEST, setup=lambda ws: (ws.src / MANIFEST).write_text("{")),
    Case("package-manifest-a-list", P, MANIFEST, setup=lambda ws: (ws.src / MANIFEST).write_text("[]")),
    Case("package-manifest-nesting-bomb", P, MANIFEST, setup=lambda ws: (ws.src / MANIFEST).write_text(deep_json())),
    Case("package-artifacts-not-a-list", P, MANIFEST,
         setup=src_manifest(lambda d: d.update(artifacts={"onnx-mobile": 1}))),
    Case("package-artifact-entry-a-string", P, MANIFEST,
         setup=src_manifest(lambda d: d.update(artifacts=["onnx-mobile"]))),
    Case("package-artifact-without-name", P, MANIFEST,
         setup=src_manifest(lambda d: [a.pop("name") for a in d["artifacts"]])),
    Case("package-artifact-path-outside", P, MANIFEST, setup=_artifact_path_outside),
    Case("package-artifact-path-absolute", P, MANIFEST, setup=_artifact_path_absolute),
    Case("package-file-entry-outside", P, MANIFEST, setup=_package_file_outside),
    Case("package-file-size-a-string", P, MANIFEST, setup=src_manifest(_size_as_string)),
    Case("package-truncated-weights", P, "model.onnx.data",
         setup=lambda ws: _truncate(ws.src / "onnx-mobile" / "model.onnx.data")),
    Case("package-lfs-pointer-weights", P, "model.onnx.data",
         setup=lambda ws: (ws.src / "onnx-mobile" / "model.onnx.data").write_text(LFS_POINTER)),
    Case("package-no-mobile-artifact", P, "mobile",
         setup=src_manifest(lambda d: d.update(artifacts=[a for a in d["artifacts"] if a.get("target") != "mobile"]))),
    Case("package-genai-config-empty", P, "genai_config.json", setup=_package_genai_config_empty),
    Case("package-validate-not-json", P + ("--validate", "{in}/v.json"), "v.json",
         setup=lambda ws: (ws.inp / "v.json").write_text("{")),
    Case("package-validate-nesting-bomb", P + ("--validate", "{in}/v.json"), "v.json",
         setup=lambda ws: (ws.inp / "v.json").write_text(deep_json())),
    Case("package-out-is-a-file", P, "{out}", setup=lambda ws: ws.out.write_text("precious")),
    Case("package-out-foreign-folder-force", P + ("--force",), "{out}",
         setup=lambda ws: (ws.out.mkdir(), (ws.out / "notes.txt").write_text("precious"))),
    Case("package-out-inside-source", ("package", "{src}", "--target", "android", "--out", "{src}/bundle"),
         ("--out", "{src}/bundle")),
    Case("package-out-is-the-source-force", ("package", "{src}", "--target", "android", "--out", "{src}", "--force"),
         ("--out", "{src}"), notes="the source OUT is phi3-export output, so --force would replace the input itself"),
]

VERIFY = [Case(c.id, c.args, c.names, c.setup, exit=1, kind="verify", notes=c.notes) for c in [
    Case("verify-folder-missing", ("verify", "{in}/nope"), MANIFEST),
    Case("verify-bundle-is-a-file", ("verify", "{in}/file"), MANIFEST, setup=lambda ws: (ws.inp / "file").write_text("x")),
    Case("verify-manifest-missing", V, MANIFEST, setup=lambda ws: (ws.bundle / MANIFEST).unlink()),
    Case("verify-manifest-not-json", V, MANIFEST, setup=lambda ws: (ws.bundle / MANIFEST).write_text("{")),
    Case("verify-manifest-a-list", V, MANIFEST, setup=lambda ws: (ws.bundle / MANIFEST).write_text("[]")),
    Case("verify-manifest-not-utf8", V, MANIFEST, setup=lambda ws: (ws.bundle / MANIFEST).write_bytes(b'{"files": "\xff"}')),
    Case("verify-manifest-nesting-bomb", V, MANIFEST, setup=lambda ws: (ws.bundle / MANIFEST).write_text(deep_json())),
    Case("verify-manifest-empty-object", V, MANIFEST, setup=lambda ws: (ws.bundle / MANIFEST).write_text("{}"),
         notes="a manifest that lists nothing must not verify"),
    Case("verify-files-a-dict", V, MANIFEST, setup=bundle_manifest(lambda d: d.update(files={"onnx/model.onnx": 1}))),
    Case("verify-file-entry-without-size", V, (MANIFEST, "onnx/"), setup=bundle_manifest(lambda d: d["files"][0].pop("size"))),
    Case("verify-file-entry-outside", V, "secret.txt", setup=_verify_file_outside),
    Case("verify-file-entry-absolute", V, "secret.txt", setup=lambda ws: _verify_file_outside(ws, absolute=True)),
    Case("verify-model-folder-outside", V, "outside", setup=_verify_model_outside),
    Case("verify-model-without-format", V, MANIFEST, setup=bundle_manifest(lambda d: d["models"][0].pop("format"))),
    Case("verify-truncated-weights", V, "model.onnx.data",
         setup=lambda ws: _truncate(ws.bundle / "onnx" / "model.onnx.data")),
    Case("verify-lfs-pointer-weights", V, "model.onnx.data",
         setup=lambda ws: (ws.bundle / "onnx" / "model.onnx.data").write_text(LFS_POINTER)),
    Case("verify-altered-tokenizer", V, "tokenizer.json",
         setup=lambda ws: _flip_byte(ws.bundle / "onnx" / "tokenizer.json")),
    Case("verify-genai-config-empty", V, "onnx", setup=_verify_genai_config_empty),
]]


@pytest.mark.parametrize("case", **cases_by_id(PACKAGE))
def test_hostile_package_input(case: Case, workspace: Workspace):
    check_case(case, workspace)


@pytest.mark.parametrize("case", **cases_by_id(VERIFY))
def test_hostile_bundle_verify(case: Case, workspace: Workspace):
    check_case(case, workspace)


def test_bundles_positive_control(workspace: Workspace):
    """The same inputs undamaged: package exits 0 leaving its source as it was, and verify passes the result."""
    before = snapshot(workspace.src)
    run = run_cli(workspace.args(P), cwd=workspace.root, home=workspace.home)
    assert run.returncode == 0, run.describe()
    assert not diff(before, snapshot(workspace.src)), "package modified its source"
    assert leftovers(workspace.outs) == []
    check = run_cli(("verify", workspace.out), cwd=workspace.root, home=workspace.home)
    assert check.returncode == 0 and "verified" in check.stdout, check.describe()
    assert "Traceback" not in run.stderr + check.stderr
