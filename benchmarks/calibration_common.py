"""What the calibration benchmarks share: the full-size random checkpoint, results merged
into build/bench/bench_calibration.json by mode and label, a CPU/wall stopwatch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phi3_export.memory import run_measured

RECIPE = "phi-3-mini-4k"
OUT = REPO / "build" / "bench" / "bench_calibration.json"
WORK = REPO / "build" / "calibration"
SMOLLM2 = REPO / "build" / "fixtures" / "smollm2-135m-phi3"
# The exhaustive searches the cheaper ones replaced (with search_scale(keep=0): every alpha on every token).
OLD_SEARCH = {"score_tokens": 4096, "clip_tokens": 256, "clip_refine": False}


def merge_result(path: Path, section: str, label: str, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.is_file() else {"schema_version": 1}
    doc.setdefault(section, {})[label] = value
    path.write_text(json.dumps(doc, indent=2) + "\n")


def full_size_checkpoint(work: Path, layers: int) -> Path:
    """A random bf16 Phi-3-mini-shape checkpoint with ``layers`` decoder layers (kept: deterministic)."""
    ckpt = work / f"{RECIPE}-{layers}-layers"
    if not (ckpt / "config.json").is_file():
        r = run_measured([sys.executable, "-m", "phi3_export", "fixture", "--recipe", RECIPE, "--full-size", "--random",
                          "--layers", str(layers), "--out", str(ckpt), "--force", "--quiet"])
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
    return ckpt


def awq_options(overrides: dict):
    from phi3_export.quant.awq_search import AwqOptions

    return AwqOptions(**overrides)


class Stopwatch:
    """Wall and process CPU seconds (all threads) per lap: CPU time is the fairer figure when
    other work shares the cores (wall then stretches, CPU seconds barely move)."""

    def __init__(self):
        self.start = self.last = (time.perf_counter(), time.process_time())

    def lap(self) -> dict:
        now = (time.perf_counter(), time.process_time())
        lap = {"wall_s": round(now[0] - self.last[0], 2), "cpu_s": round(now[1] - self.last[1], 2)}
        self.last = now
        return lap

    def total(self) -> dict:
        now = (time.perf_counter(), time.process_time())
        return {"wall_s": round(now[0] - self.start[0], 2), "cpu_s": round(now[1] - self.start[1], 2)}
