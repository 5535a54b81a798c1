"""Three runs started together for one --out: exactly one writes it, the other two fail at once with one
line naming the process that holds it; what was written is whole, loads, and is what one run alone
writes. A run for another --out beside it is not blocked.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from reliability_harness import cli_command, cli_env, snapshot

WAIT_S = 240


def start(checkpoint: Path, out: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as stderr:
        return subprocess.Popen(cli_command("quantize", "--checkpoint", checkpoint, "--out", out, "--quiet", "--target", "cpu"),
                                cwd=out.parent, env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr)


def wait_all(procs: list[subprocess.Popen]) -> dict[int, float]:
    """Wait for every process; when each ended (monotonic seconds)."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + WAIT_S
    try:
        while len(ended) < len(procs):
            assert time.monotonic() < deadline, f"runs still going after {WAIT_S} s"
            for proc in procs:
                if proc.pid not in ended and proc.poll() is not None:
                    ended[proc.pid] = time.monotonic()
            time.sleep(0.01)
    finally:
        for proc in procs:
            proc.kill()
    return ended


def files(folder: Path) -> dict[str, tuple]:
    return {path: entry for path, entry in snapshot(folder).items() if entry[0] == "file"}


def loads_and_generates(artifact: Path) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    ids = og.Tokenizer(model).encode("Hello")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 2)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generator.generate_next_token()


def test_three_runs_one_out_exactly_one_writes_it(big_checkpoint, big_reference_export, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "out"
    procs = [start(big_checkpoint, out, tmp_path / f"stderr{i}.log") for i in range(3)]
    ended = wait_all(procs)
    results = [(proc, (tmp_path / f"stderr{i}.log").read_text()) for i, proc in enumerate(procs)]
    report = "\n".join(f"pid {p.pid}: exit {p.returncode}, stderr: {err.strip()!r}" for p, err in results)

    winners = [p for p, _ in results if p.returncode == 0]
    assert len(winners) == 1, f"expected exactly one run to succeed:\n{report}"
    winner = winners[0]
    for proc, stderr in results:
        if proc is winner:
            continue
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, f"a losing run should exit 2 (bad input: --out is busy):\n{report}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line:\n{report}"
        assert re.search(rf"\b{winner.pid}\b", lines[0]), f"the error does not name the writing process {winner.pid}:\n{report}"
        assert ended[proc.pid] < ended[winner.pid], f"pid {proc.pid} did not fail at once (it waited for the writer):\n{report}"
        assert "Traceback" not in stderr

    assert sorted(p.name for p in outs.iterdir()) == ["out"], f"left beside --out: {sorted(p.name for p in outs.iterdir())}"
    assert files(out) == files(big_reference_export), "the output differs from what a single run writes"
    loads_and_generates(out / "onnx-cpu")


def test_a_run_for_another_out_is_not_blocked(fixture_dir, tmp_path):
    """Positive control: the lock is per --out. While outs/a is locked (held here, as a running
    export would hold it), a run for outs/b beside it succeeds and a run for outs/a is refused."""
    from phi3_export.output import _Lock

    outs = tmp_path / "outs"
    outs.mkdir()
    tiny = fixture_dir("phi-3-mini-4k")
    with _Lock(outs / "a"):
        other = subprocess.run(cli_command("quantize", "--checkpoint", tiny, "--out", outs / "b", "--quiet", "--target", "cpu"),
                               cwd=outs, env=cli_env(), capture_output=True, text=True, timeout=WAIT_S, check=False)
        blocked = subprocess.run(cli_command("quantize", "--checkpoint", tiny, "--out", outs / "a", "--quiet", "--target", "cpu"),
                                 cwd=outs, env=cli_env(), capture_output=True, text=True, timeout=WAIT_S, check=False)
    assert other.returncode == 0, other.stderr
    assert (outs / "b" / "manifest.json").is_file()
    assert blocked.returncode == 2 and "another phi3-export run" in blocked.stderr, blocked.stderr
    assert not (outs / "a").exists()
