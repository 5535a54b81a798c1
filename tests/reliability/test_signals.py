"""Interrupting an export mid-write: SIGTERM and Ctrl-C (SIGINT) clean up and exit 143/130; after SIGKILL
(nothing can clean up) the next run for that --out removes the debris, says so, and writes an output
byte-identical to an uninterrupted run.

The checkpoint is big enough (8 layers, hidden 512) that an export takes a few seconds; each
signal is sent once the staging folder ``.out.partial-*`` beside --out holds a file, so it lands
mid-write. A run that finishes before that fails the test: it would prove nothing.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability_harness import cli_command, cli_env, diff, leftovers, run_cli, snapshot

WAIT_S = 180


def _default_sigint() -> None:
    # A job started in the background by a non-interactive shell inherits SIGINT ignored; Ctrl-C is the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_export(checkpoint: Path, out: Path, log: Path) -> subprocess.Popen:
    """`phi3-export quantize` in a new interpreter, stderr to ``log`` (read after it exits)."""
    with log.open("w") as stderr:
        return subprocess.Popen(cli_command("quantize", "--checkpoint", checkpoint, "--out", out, "--quiet", "--target", "cpu"),
                                cwd=out.parent, env=cli_env(out.parent.parent / "home"), stdout=subprocess.DEVNULL,
                                stderr=stderr, preexec_fn=_default_sigint)  # noqa: PLW1509 - one signal() call


def wait_mid_write(proc: subprocess.Popen, out: Path) -> Path:
    """The staging folder beside ``out``, once a file has been written into it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the export ended (exit {proc.returncode}) before it was seen mid-write: "
                        f"no .{out.name}.partial-* with a file in it beside {out}")
        for staging in out.parent.glob(f".{out.name}.partial-*"):
            if any(p.is_file() for p in staging.rglob("*")):
                assert not out.exists(), f"{out} exists while the run is still writing: the output is not staged"
                return staging
        time.sleep(0.01)
    pytest.fail(f"no .{out.name}.partial-* with a file in it appeared beside {out} within {WAIT_S} s")


def files(folder: Path) -> dict[str, tuple]:
    return {path: entry for path, entry in snapshot(folder).items() if entry[0] == "file"}


@pytest.fixture
def outs(tmp_path) -> Path:
    (tmp_path / "home").mkdir()
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_export_cleans_up_and_exits(signum, status, big_checkpoint, outs):
    before = snapshot(big_checkpoint)
    out, log = outs / "out", outs.parent / "stderr.log"
    proc = start_export(big_checkpoint, out, log)
    try:
        wait_mid_write(proc, out)
        proc.send_signal(signum)
        returncode = proc.wait(timeout=60)
    finally:
        proc.kill()
    stderr = log.read_text()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == status, f"exit {returncode}, expected {status}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one stderr line:\n{stderr}"
    assert list(outs.iterdir()) == [], f"left at/beside --out: {sorted(p.name for p in outs.iterdir())}"
    assert not diff(before, snapshot(big_checkpoint)), "the checkpoint changed"


def test_sigkill_then_rerun_cleans_up_and_matches_an_uninterrupted_run(big_checkpoint, big_reference_export, outs):
    out, log = outs / "out", outs.parent / "stderr.log"
    proc = start_export(big_checkpoint, out, log)
    try:
        staging = wait_mid_write(proc, out)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert staging.is_dir() and not out.exists(), "SIGKILL cannot clean up: the staging folder should be there"

    rerun = run_cli(("quantize", "--checkpoint", big_checkpoint, "--out", out, "--quiet", "--target", "cpu"),
                    cwd=outs, home=outs.parent / "home", fresh=True, timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.describe()
    assert staging.name in rerun.stderr, f"the rerun does not say it removed {staging.name}:\n{rerun.describe()}"
    assert "Traceback" not in rerun.stderr
    assert sorted(p.name for p in outs.iterdir()) == ["out"], f"leftovers: {leftovers(outs)}"
    assert files(out) == files(big_reference_export), "the rerun's output differs from an uninterrupted run's"
