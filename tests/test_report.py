"""`report`: three files from validate records, a real plot, and a gate that fails on regressions."""

import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from phi3_export.progress import Progress
from phi3_export.validate.run import ValidateOptions, validate_artifacts

TRAINED = {"train_steps": 150}
RED, BLUE = (214, 39, 40), (31, 119, 180)  # matplotlib tab:red (Pareto front) and tab:blue markers


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "phi3_export", *map(str, args)], check=False, capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def records(exported, fixture_dir, tmp_path_factory):
    """Validate results for three artifacts of one trained fixture: fp32, int4 g32 sym, int4 g128 asym."""
    folder = tmp_path_factory.mktemp("records")
    reference = fixture_dir("phi-3-mini-4k", **TRAINED)
    options = ValidateOptions(cache_dir=folder / "cache", window=256, prompt_lengths=(32,), new_tokens=8, runs=3)
    paths = []
    for name, kwargs in {"fp32": {"bits": 32}, "g32s": {"bits": 4, "block_size": 32, "symmetric": True},
                         "g128a": {"bits": 4, "block_size": 128, "symmetric": False}}.items():
        out = exported("phi-3-mini-4k", TRAINED, targets=("cpu",), **kwargs)
        result = validate_artifacts(out, reference, options, Progress(enabled=False))
        path = folder / f"{name}.json"
        path.write_text(json.dumps(result))
        paths.append(path)
    return paths


def _markers(png: bytes) -> int:
    """Filled marker discs in the plot: connected blobs of the two marker colours, legend excluded by size."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    count = 0
    for colour in (RED, BLUE):
        mask = (np.abs(pixels - np.array(colour)).sum(-1) < 30)
        seen = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            stack, size = [(y, x)], 0
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                size += 1
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            count += size >= 20  # a marker disc; antialiasing specks are smaller
    return count


def test_report_renders_three_files_and_one_marker_per_artifact(records, tmp_path):
    result = _cli("report", *records, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "report"
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema_version"] == 1 and len({r["artifact"] for r in doc["rows"]}) == 3
    md = (out / "report.md").read_text()
    for name in ("float-w32-onnx-cpu", "rtn-w4g32s-onnx-cpu", "rtn-w4g128a-onnx-cpu"):
        assert name in md
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] >= 500
    assert _markers(png) == 3
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")  # opens offline
    bits = {r["artifact"]: r["bits_per_weight"] for r in doc["rows"]}
    assert bits["phi-3-mini-4k-float-w32-onnx-cpu"] > 32 > bits["phi-3-mini-4k-rtn-w4g32s-onnx-cpu"]  # everything counted


def test_same_records_give_the_same_report(records, tmp_path):
    for name in ("a", "b"):
        assert _cli("report", *records, "--out", tmp_path / name).returncode == 0
    for file in ("report.json", "report.md", "report.png", "report.html"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_equal_runs_pass_the_gate(records, tmp_path):
    assert _cli("report", *records, "--out", tmp_path / "base").returncode == 0
    result = _cli("report", *records, "--out", tmp_path / "now", "--baseline", tmp_path / "base" / "report.json")
    assert result.returncode == 0, result.stderr
    assert "No regressions." in (tmp_path / "now" / "report.md").read_text()


def test_a_better_baseline_fails_the_gate_naming_artifact_and_metric(records, tmp_path):
    doc = json.loads(records[1].read_text())
    better = copy.deepcopy(doc)
    record = better["records"][0]
    record["accuracy"]["kld_mean"] *= 0.1  # a tiny model's KLD is ~5e-4: gate at 1e-4 rather than the default 0.01
    record["size_bytes"] = int(record["size_bytes"] * 0.9)
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(better))
    result = _cli("report", *records, "--out", tmp_path / "now", "--baseline", baseline, "--max-kld-increase", "1e-4")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "REGRESSION" in line]
    assert any(record["artifact"] in line and "kld_mean" in line for line in lines), result.stderr
    assert any(record["artifact"] in line and "size_bytes" in line for line in lines), result.stderr
    # a looser threshold from the command line lets the same run pass
    loose = _cli("report", *records, "--out", tmp_path / "loose", "--baseline", baseline, "--max-kld-increase", "1",
                 "--max-size-increase-pct", "20")
    assert loose.returncode == 0, loose.stderr


def test_speed_is_gated_only_on_the_same_machine(records, tmp_path):
    doc = json.loads(records[1].read_text())
    faster = copy.deepcopy(doc)
    speed = faster["records"][0]["speed"]["32"]["decode_tokens_per_s"]
    speed["median"] *= 10
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(faster))
    same = _cli("report", records[1], "--out", tmp_path / "same", "--baseline", baseline)
    assert same.returncode == 1 and "decode_tokens_per_s" in same.stderr
    faster["records"][0]["machine"] = {**faster["records"][0]["machine"], "cpu": "another CPU"}
    baseline.write_text(json.dumps(faster))
    other = _cli("report", records[1], "--out", tmp_path / "other", "--baseline", baseline)
    assert other.returncode == 0 and "not gated" in other.stderr


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "invalid JSON at line 1"),
    ('{"records": 3}', "not a validate result"),
    ('{"schema_version": 9, "records": []}', "schema_version 9"),
])
def test_bad_record_files_are_one_line_errors(content, message, tmp_path):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    result = _cli("report", path, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_report_refuses_to_replace_a_folder_that_is_not_a_report(records, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = _cli("report", *records, "--out", tmp_path)
    assert result.returncode == 2 and "not a report folder" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_sweep_quantizes_validates_and_reports_a_grid(fixture_dir, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # the reference-logit cache
    result = _cli("sweep", "--checkpoint", fixture_dir("phi-3-mini-4k", **TRAINED), "--out", tmp_path / "sweep",
                  "--method", "rtn", "--block-size", "32,64", "--both-symmetries", "--no-speed", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "sweep" / "report" / "report.json").read_text())
    names = sorted(r["artifact"] for r in doc["rows"])
    assert names == sorted(f"phi-3-mini-4k-rtn-w4g{b}{s}-onnx-cpu" for b in (32, 64) for s in "as")
    assert all(r["kld_mean"] > 0 for r in doc["rows"])
