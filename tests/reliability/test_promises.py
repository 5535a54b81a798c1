"""The promises that are not one bad input each: --force replaces only phi3-export output and only once
the new one is whole; a killed run's staging folder is removed by the next run for that --out (with a
message) and nobody else's is touched; a bug is one `internal error:` line (exit 1) and --debug shows
the traceback; disk full is one line with nothing left; nothing from a checkpoint is ever executed.

Faults are injected by running the CLI in a fresh interpreter with one function replaced.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_harness import Workspace, cli_env, diff, edit_json, leftovers, run_cli, snapshot

Q = ("quantize", "--checkpoint", "{ckpt}", "--out", "{out}", "--quiet", "--target", "cpu")


def run_with_fault(ws: Workspace, fault: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI with ``phi3_export.api.export_onnx`` replaced: ``fault`` is the body of the replacement.
    (The workspace's inputs are copied in by ``ws.args`` before any snapshot is taken: call ``ws.args(Q)`` first.)"""
    code = (
        "import errno, sys\n"
        "import phi3_export.api as api\n"
        "real = api.export_onnx\n"
        "def export_onnx(job, qckpt, target, folder):\n"
        "    real(job, qckpt, target, folder)  # something is written first: the fault is mid-write\n"
        f"    {fault}\n"
        "api.export_onnx = export_onnx\n"
        "from phi3_export.cli import main\n"
        "main(prog_name='phi3-export')\n"
    )
    return subprocess.run([sys.executable, "-c", code, *ws.args(args)], cwd=ws.root, env=cli_env(ws.home), capture_output=True,
                          text=True, timeout=180, check=False)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_force_replaces_our_own_output_and_leaves_nothing_beside_it(workspace: Workspace):
    first = run_cli(workspace.args(Q), cwd=workspace.root, home=workspace.home)
    assert first.returncode == 0, first.describe()
    (workspace.out / "stray.txt").write_text("from the first run")
    second = run_cli(workspace.args(Q + ("--force",)), cwd=workspace.root, home=workspace.home)
    assert second.returncode == 0, second.describe()
    assert (workspace.out / "manifest.json").is_file() and not (workspace.out / "stray.txt").exists()
    assert sorted(p.name for p in workspace.outs.iterdir()) == ["out"], leftovers(workspace.outs)


def test_force_keeps_the_old_output_when_the_new_run_fails(workspace: Workspace):
    """--force replaces only once the new output is complete: a run that fails mid-write changes nothing."""
    first = run_cli(workspace.args(Q), cwd=workspace.root, home=workspace.home)
    assert first.returncode == 0, first.describe()
    before = snapshot(workspace.root)
    proc = run_with_fault(workspace, "raise RuntimeError('injected fault')", *Q, "--force")
    assert proc.returncode == 1, proc.stderr
    assert not diff(before, snapshot(workspace.root)), "the old output or the inputs changed"


def test_stale_staging_of_a_killed_run_is_removed_with_a_message(workspace: Workspace):
    stale = workspace.outs / ".out.partial-k1ll3d"
    (stale / "onnx-cpu").mkdir(parents=True)
    (stale / "onnx-cpu" / "model.onnx.data").write_bytes(b"\0" * 1000)
    old = workspace.outs / ".out.old-k1ll3d"
    old.mkdir()
    others = workspace.outs / ".other.partial-abc123"  # another --out's: not this run's to remove
    others.mkdir()
    (others / "keep").write_text("x")
    run = run_cli(workspace.args(Q), cwd=workspace.root, home=workspace.home)
    assert run.returncode == 0, run.describe()
    assert not stale.exists() and not old.exists(), sorted(p.name for p in workspace.outs.iterdir())
    assert stale.name in run.stderr and old.name in run.stderr, f"no message about the removed folders:\n{run.describe()}"
    assert (others / "keep").read_text() == "x", "a staging folder of another --out was touched"
    assert sorted(p.name for p in workspace.outs.iterdir()) == [".other.partial-abc123", "out"]


def test_internal_error_is_one_line_and_debug_prints_the_traceback(workspace: Workspace):
    workspace.args(Q)  # the checkpoint is copied in
    before = snapshot(workspace.root)
    proc = run_with_fault(workspace, "raise RuntimeError('injected fault')", *Q)
    assert proc.returncode == 1, proc.stderr
    assert lines(proc.stderr) and len(lines(proc.stderr)) == 1, proc.stderr
    line = lines(proc.stderr)[0]
    assert line.startswith("internal error: ") and "injected fault" in line and "--debug" in line, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not diff(before, snapshot(workspace.root)), "a failed run left something behind or changed its input"

    debug = run_with_fault(workspace, "raise RuntimeError('injected fault')", "--debug", *Q)
    assert debug.returncode == 1, debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr and "RuntimeError: injected fault" in debug.stderr
    assert lines(debug.stderr)[-1].startswith("internal error: "), debug.stderr
    assert not diff(before, snapshot(workspace.root))


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(workspace: Workspace):
    workspace.args(Q)  # the checkpoint is copied in
    before = snapshot(workspace.root)
    enospc = "raise OSError(errno.ENOSPC, 'No space left on device', str(folder / 'model.onnx.data'))"
    proc = run_with_fault(workspace, enospc, *Q)
    assert proc.returncode == 2, proc.stderr
    assert len(lines(proc.stderr)) == 1 and lines(proc.stderr)[0].startswith("error: "), proc.stderr
    assert "out" in lines(proc.stderr)[0] and "space" in lines(proc.stderr)[0], proc.stderr
    assert not diff(before, snapshot(workspace.root)), "disk full left something behind"


MARKER = "code-from-checkpoint-ran"
EVIL_PY = f"import pathlib\npathlib.Path(__file__).resolve().parents[2].joinpath({MARKER!r}).write_text('pwned')\n"
# A pickle that runs `touch <marker>` (in the working folder: the workspace) when loaded, as torch.load would.
EVIL_PICKLE = b"cos\nsystem\n(S'touch " + MARKER.encode() + b"'\ntR."


def _plant_code(ws: Workspace) -> None:
    ckpt = ws.ckpt
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py", "__init__.py"):
        (ckpt / name).write_text(EVIL_PY)
    edit_json(ckpt / "config.json", lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                                 "AutoModelForCausalLM": "modeling_evil.EvilModel"}))
    (ckpt / "pytorch_model.bin").write_bytes(EVIL_PICKLE)  # beside the safetensors: must never be loaded


@pytest.mark.parametrize("command", ["quantize", "validate"])
def test_no_code_from_a_checkpoint_runs(command: str, workspace: Workspace):
    _plant_code(workspace)
    if command == "quantize":
        args = Q
    else:
        shutil.copytree(workspace.src, workspace.inp / "src2")
        args = ("validate", "{in}/src2", "--reference", "{ckpt}", "--no-speed", "--quiet", "--window", "64",
                "--cache-dir", "{cache}")
    before = snapshot(workspace.ckpt)
    run = run_cli(workspace.args(args), cwd=workspace.root, home=workspace.home)
    assert not (workspace.root / MARKER).exists() and not any(Path(workspace.root).rglob(MARKER)), \
        f"code from the checkpoint ran:\n{run.describe()}"
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.describe()
    if command == "quantize":
        assert run.returncode == 0, run.describe()  # auto_map and a stray .bin are ignored, not fatal
    assert not diff(before, snapshot(workspace.ckpt)), "the checkpoint changed"
