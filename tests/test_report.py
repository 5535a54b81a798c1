"""`report`: three files from validate records, a real plot, and a gate that fails on regressions."""

import copy
import io
import json
import os
import shutil
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


def _markers(png: bytes, frame: list[int]) -> int:
    """Filled markers in the plot's frame (the legend below it is left out): connected blobs of the two marker colours."""
    left, top, right, bottom = frame
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)[top:bottom, left:right]
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
    assert _markers(png, doc["plot_axes"]["frame_px"]) == 3
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")  # opens offline
    bits = {r["artifact"]: r["bits_per_weight"] for r in doc["rows"]}
    assert bits["phi-3-mini-4k-float-w32-onnx-cpu"] > 32 > bits["phi-3-mini-4k-rtn-w4g32s-onnx-cpu"]  # everything counted
    # beside it, the linear weights alone, from the settings: 4 bits + an fp32 scale per block (+ a 4-bit zero point if asymmetric)
    linear = {r["artifact"]: r["linear_bits_per_weight"] for r in doc["rows"]}
    assert linear == {"phi-3-mini-4k-float-w32-onnx-cpu": 32.0, "phi-3-mini-4k-rtn-w4g32s-onnx-cpu": 4 + 32 / 32,
                      "phi-3-mini-4k-rtn-w4g128a-onnx-cpu": 4 + (32 + 4) / 128}
    assert "bits/w linear" in md and "bits/w whole" in md and "test model those float tensors and files dominate" in md


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
    now = json.loads((tmp_path / "now" / "report.json").read_text())
    assert now["verdict"]["verdict"] == "fail" and now["verdict"]["failing"] == [record["artifact"]]
    assert "**FAIL — regressed vs baseline: kld_mean, size_bytes**" in (tmp_path / "now" / "report.md").read_text()
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


# ---- header, verdict, plot ---------------------------------------------------------------------

OLD_ROW_KEYS = {"artifact", "provider", "status", "reason", "target", "size_bytes", "bits_per_weight", "perplexity_reference",
                "perplexity", "perplexity_change_pct", "kld_mean", "kld_p99", "top1_agreement", "prefill_tps", "decode_tps",
                "ttft_s", "peak_rss_anon_mb", "machine", "source"}


def _report(paths, out):
    from phi3_export.report import build_report

    return build_report(list(paths), out)


def test_report_json_keeps_its_schema_and_adds_header_results_and_verdict(records, tmp_path):
    doc = _report(records, tmp_path / "r")
    assert doc["schema_version"] == 1 and doc["kind"] == "phi3-export report"
    assert all(OLD_ROW_KEYS <= set(row) for row in doc["rows"])  # the CI gate's fields: extended, never renamed
    assert all(set(p) == {"artifact", "x", "kld_mean"} for p in doc["plot"])
    assert {"baseline", "findings", "notes", "regressions", "records"} <= set(doc)
    assert doc["verdict"]["verdict"] == "pass" and all(row["verdict"] == "pass" for row in doc["rows"])


def test_header_names_model_recipe_settings_date_machine_versions_and_reference_perplexity(records, tmp_path):
    doc = _report(records, tmp_path / "r")
    head, record = doc["header"], json.loads(records[1].read_text())["records"][0]
    assert head["recipes"] == ["phi-3-mini-4k"] and head["weights"] == [record["weights"]]
    assert head["model"] == [record["reference"]]
    assert head["settings"] == ["unquantized fp32", "rtn int4, blocks of 32, symmetric, accuracy_level 4",
                                "rtn int4, blocks of 128, asymmetric, accuracy_level 4"]
    assert head["date"] and "UTC" in head["date"]
    m = record["machine"]
    assert head["machines"] == [f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']:g} GB RAM, {m['os']}, Python {m['python']}"]
    assert head["versions"][0].startswith(f"phi3-export {record['versions']['phi3-export']}, torch ")
    ppl = record["accuracy"]["perplexity_reference"]
    assert [p["perplexity"] for p in head["reference_perplexity"]] == [ppl]  # one reference, one eval text
    md = (tmp_path / "r" / "report.md").read_text()
    page = (tmp_path / "r" / "report.html").read_text()
    for label in ("Model", "Recipe", "Settings", "Reference perplexity", "Date", "Machine", "Versions"):
        assert f"**{label}:**" in md and f"<dt>{label}</dt>" in page
    for text in (f"{ppl:.3f} on", record["machine"]["cpu"], f"onnxruntime {record['versions']['onnxruntime']}",
                 record["reference"]["sha256"][:12], "**Verdict: PASS"):
        assert text in md, text
    assert f"{ppl:.3f} on" in page and '<div class="verdict pass">PASS' in page


def test_a_failing_check_fails_the_verdict_and_is_named(records, tmp_path):
    doc = json.loads(records[1].read_text())
    record = doc["records"][0]
    record["checks"] = [*record["checks"], {"name": "made_up_check", "passed": False, "detail": "deliberately broken"},
                        {"name": "informative_finding", "passed": None, "detail": "no judgement"}]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    report = _report([records[0], broken], tmp_path / "r")
    name = record["artifact"]
    assert report["verdict"]["verdict"] == "fail" and report["verdict"]["failing"] == [name]
    result = next(a for a in report["artifacts"] if a["artifact"] == name)
    assert result["verdict"] == "fail" and result["failed_checks"] == ["made_up_check"]  # None is a finding, not a failure
    assert result["summary"] == "FAIL — failed check: made_up_check"
    assert next(a for a in report["artifacts"] if a["artifact"] != name)["verdict"] == "pass"
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"**Verdict: FAIL — 1 of 2 artifacts fail: {name}**" in md
    assert "❌ check `made_up_check`: deliberately broken" in md and "ℹ️ check `informative_finding`" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert '<div class="verdict fail">' in page and "FAIL — failed check: made_up_check" in page
    assert '<td class="bad">✗ FAIL</td><td class="l"><code>made_up_check</code>' in page


def test_not_run_records_stay_visible_with_their_reason_never_as_numbers(records, tmp_path):
    doc = json.loads(records[1].read_text())
    skipped = {**copy.deepcopy(doc["records"][0]), "provider": "qnn", "status": "not run",
               "reason": "QNN needs a Qualcomm NPU", "accuracy": None, "speed": None}
    doc["records"].append(skipped)
    path = tmp_path / "with-skip.json"
    path.write_text(json.dumps(doc))
    report = _report([path], tmp_path / "r")
    assert report["verdict"]["verdict"] == "pass"  # not run is neither a pass nor a failure
    provider = next(p for p in report["artifacts"][0]["providers"] if p["provider"] == "qnn")
    assert provider == {**provider, "verdict": "not run", "reason": "QNN needs a Qualcomm NPU"}
    md = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {skipped['artifact']} | qnn |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "NOT RUN" and cells[3] == "not run: QNN needs a Qualcomm NPU" and not any(cells[4:])
    assert "**[qnn] not run:** QNN needs a Qualcomm NPU" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert 'colspan="12">not run: QNN needs a Qualcomm NPU</td>' in page


def _row(artifact, provider="cpu", bits=4, x=None, kld=1e-3, fmt="onnx", size=None, weights=1_000_000):
    from phi3_export.report.records import row_from_record

    settings = {"bits": bits, "method": "rtn", "block_size": 32, "symmetric": True, "accuracy_level": 4, "overrides": {}}
    record = {"artifact": artifact, "provider": provider, "status": "ok", "format": fmt, "target": "cpu" if fmt == "onnx" else None,
              "size_bytes": size or int((x or bits + 1) * weights / 8), "weights": weights, "settings": settings,
              "recipe": "phi-3-mini-4k", "accuracy": {"kld_mean": kld, "perplexity_reference": 10.0}}
    return row_from_record(record, "test.json")


def _figure(rows):
    from phi3_export.report.plot import plot_figure, plot_subtitle

    head = {"reference_perplexity": [{"positions": 4232, "eval_text": "default corpus, eval part"}]}
    fig, ax, facts = plot_figure(rows, plot_subtitle(head, rows))
    return fig, ax, facts


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_axis_covers_the_points_with_padding_and_reads_a_one_percent_difference_as_small():
    from phi3_export.report.plot import plot_series

    # the example: two int4 artifacts 1% apart in KLD and an fp32 export at ~1e-13
    rows = [_row("m-rtn-w4g32s-onnx-cpu", x=9.5, kld=1.648e-3), _row("m-rtn-w4g128a-onnx-cpu", x=14.2, kld=1.664e-3),
            _row("m-float-w32-onnx-cpu", bits=32, x=43.1, kld=6e-14)]
    fig, ax, facts = _figure(rows)
    try:
        assert facts["y"]["scale"] == "linear" and facts["x"]["scale"] == "linear"  # < one decade between the int4 points
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        xs, ys = [9.5, 14.2, 43.1], [1.648e-3, 1.664e-3, 6e-14]
        assert x0 < min(xs) and x1 > max(xs) and y0 < min(ys) and y1 > max(ys)
        assert 0.03 <= (min(xs) - x0) / (max(xs) - min(xs)) <= 0.5 and 0.03 <= (x1 - max(xs)) / (max(xs) - min(xs)) <= 0.5
        assert y0 <= 0 and (y1 - y0) > 20 * (1.664e-3 - 1.648e-3)  # the 1% gap is a sliver of the range, as it should be
        assert y1 < 2 * max(ys)
        ticks = [t for t in ax.get_yticks() if y0 <= t <= y1]
        assert len(ticks) >= 4 and "10$^{-3}$" in ax.get_ylabel()  # ×10⁻³ in the label, short tick labels
        assert all(len(t.get_text()) <= 4 for t in ax.get_yticklabels())
        # the fp32 point is there, as a star
        assert [p.float_bits for p in plot_series(rows)].count(32) == 1
        star = [c for c in ax.collections if c.get_gid() == "point-m-float-w32-onnx-cpu"]
        assert len(star) == 1 and list(star[0].get_offsets()[0]) == [43.1, 6e-14]
    finally:
        _close(fig)


def test_plot_goes_logarithmic_only_across_more_than_a_decade():
    rows = [_row("m-rtn-w4g32s-onnx-cpu", x=5, kld=2e-3), _row("m-rtn-w8g32s-onnx-cpu", bits=8, x=9, kld=2e-5),
            _row("m-float-w32-onnx-cpu", bits=32, x=32, kld=1e-13)]
    fig, ax, facts = _figure(rows)
    try:
        assert facts["y"]["scale"] == "log" and facts["x"]["scale"] == "linear"  # x: 5..32 is under a decade
        y0, y1 = ax.get_ylim()
        low, high = 2e-5, 2e-3
        assert y0 < low and high < y1 and y1 / high < 10 and low / y0 < 100  # padded, not a dozen empty decades
        # the fp32 point sits on a floor a decade under the lowest quantized one, its real KLD in its label
        label = next(t for t in ax.texts if t.get_gid() == "label-m-float-w32-onnx-cpu")
        assert "KLD 1e-13" in label.get_text()
    finally:
        _close(fig)


def test_plot_labels_lie_inside_the_axes_and_the_legend_names_front_providers_and_fp32():
    from matplotlib.text import Text

    # crowded: several artifacts at almost the same KLD, long names, the Core ML numpy reader among them
    rows = [_row(f"phi-3-mini-4k-rtn-w4g{b}s-onnx-{t}", x=x, kld=k) for b, t, x, k in
            ((32, "cpu", 23.7, 2.21e-3), (32, "mobile", 19.3, 2.21e-3), (128, "cpu", 26.0, 2.54e-3), (64, "cpu", 24.5, 2.3e-3))]
    rows += [_row("phi-3-mini-4k-rtn-w4g32s-coreml", provider="mil-reader", fmt="coreml", x=14.4, kld=2.19e-3),
             _row("phi-3-mini-4k-float-w32-onnx-cpu", bits=32, x=43.1, kld=6e-14)]
    fig, ax, facts = _figure(rows)
    try:
        renderer = fig.canvas.get_renderer()
        frame = ax.get_window_extent(renderer)
        labels = [t for t in ax.texts if (t.get_gid() or "").startswith("label-")]
        assert len(labels) == len(rows) and facts["labels_inside"]
        boxes = []
        for t in labels:
            box = Text.get_window_extent(t, renderer)
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
            boxes.append(box)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])  # none on top of another
        assert any(t.get_text() == "rtn-w4g32s-coreml [mil-reader]" for t in labels)  # the provider named at the point
        legend = fig.legends[0]
        texts = [t.get_text() for t in legend.get_texts()]
        assert any(t.startswith("Pareto front") for t in texts) and any(t.startswith("fp32 export") for t in texts)
        assert "run by onnxruntime CPU" in texts and any("numpy (mil-reader), not Core ML" in t for t in texts)
        figure = fig.bbox
        for t in fig.texts:
            box = t.get_window_extent(renderer)
            assert figure.x0 <= box.x0 and box.x1 <= figure.x1, t.get_text()
        box = legend.get_window_extent(renderer)
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and not box.overlaps(frame)
        markers = {c.get_gid(): c.get_paths()[0] for c in ax.collections}
        assert markers["point-phi-3-mini-4k-rtn-w4g32s-coreml"] != markers["point-phi-3-mini-4k-rtn-w4g32s-onnx-cpu"]
    finally:
        _close(fig)


def test_linear_bits_per_weight_follows_the_format_and_target():
    from phi3_export.report.records import linear_bits

    sym = {"bits": 4, "block_size": 32, "symmetric": True}
    assert linear_bits(sym, "onnx", "cpu") == 5.0  # fp32 scale
    assert linear_bits(sym, "onnx", "dml") == 4.5  # fp16 scale
    assert linear_bits({**sym, "symmetric": False}, "onnx", "cpu") == 4 + 36 / 32  # + a 4-bit zero point
    assert linear_bits(sym, "coreml", None) == 4 + 20 / 32  # fp16 scale and an offset, always
    assert linear_bits({"bits": 16}, "onnx", "dml") == 16.0
    assert linear_bits(None, "onnx", "cpu") is None and linear_bits(sym, "quantized-checkpoint", None) is None


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium here to look at the page with")
def test_report_page_renders_in_a_headless_browser(records, tmp_path):
    _report(records, tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1280,1600", f"--screenshot={shot}", (tmp_path / "r" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def seen(colour):
        return (np.abs(pixels - np.array(colour)).sum(-1) < 12).sum()

    assert seen(RED) > 40  # the embedded plot shows: its Pareto-front markers are on the page
    assert seen((0xE6, 0xF4, 0xEA)) > 10_000  # and so does the green PASS banner at the top


def _budget_row(artifact, x, kld, method="rtn", symmetric=True, mix=None):
    from phi3_export.report.records import row_from_record

    settings = {"bits": 4, "method": method, "block_size": 32, "symmetric": symmetric, "accuracy_level": 4, "overrides": {},
                "mix": mix or {"model.layers.0.mlp.down_proj.weight": "int8-g128", "lm_head.weight": "int4-g32"}}
    record = {"artifact": artifact, "provider": "cpu", "status": "ok", "format": "onnx", "target": "cpu",
              "size_bytes": int(x * 1_000_000 / 8), "weights": 1_000_000, "settings": settings, "recipe": "phi-3-mini-4k",
              "accuracy": {"kld_mean": kld, "perplexity_reference": 10.0}}
    return row_from_record(record, "test.json")


def test_a_size_budget_sweep_is_drawn_as_one_line_per_method_and_listed(tmp_path):
    from phi3_export.report.plot import render_plot
    from phi3_export.report.render import html_page, markdown

    sweep = [_budget_row(f"phi-3-mini-4k-rtn-budget{mb}MB-sym-onnx-cpu", x, k)
             for mb, x, k in ((100, 4.4, 3.1e-3), (120, 5.1, 1.9e-3), (150, 6.3, 1.2e-3))]
    awq = [_budget_row(f"phi-3-mini-4k-awq-budget{mb}MB-sym-onnx-cpu", x, k, method="awq")
           for mb, x, k in ((100, 4.4, 2.2e-3), (150, 6.3, 0.9e-3))]
    lone = _budget_row("phi-3-mini-4k-rtn-budget100MB-asym-onnx-cpu", 4.5, 3.5e-3, symmetric=False)  # its own settings: no curve
    rows = sweep + awq + [lone, _row("phi-3-mini-4k-rtn-w4g32s-onnx-cpu", x=5.0, kld=2.5e-3)]
    png, facts = render_plot(rows)
    assert png.startswith(b"\x89PNG")
    curves = {c["label"]: c["points"] for c in facts["curves"]}
    assert set(curves) == {"rtn", "awq"}
    assert [p[1] for p in curves["rtn"]] == [4.4, 5.1, 6.3] and [p[2] for p in curves["rtn"]] == [3.1e-3, 1.9e-3, 1.2e-3]
    assert len(curves["awq"]) == 2
    assert "size-budget sweep: rtn" in facts["legend"] and "size-budget sweep: awq" in facts["legend"]
    fig, ax, _ = _figure(rows)
    try:
        lines = {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith("curve-")}
        assert set(lines) == {"curve-rtn", "curve-awq"}
        assert list(lines["curve-rtn"].get_xdata()) == [4.4, 5.1, 6.3]  # connected in size order, through the points
    finally:
        _close(fig)
    # the PNG shows the line: the rtn curve's colour (tab:green) between its first two points
    left, top, right, bottom = facts["frame_px"]
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)[top:bottom, left:right]
    assert (np.abs(pixels - np.array((44, 160, 44))).sum(-1) < 30).sum() > 100
    md = markdown(rows, [], [], None)
    assert "## Size-budget curves" in md and md.count("phi-3-mini-4k-rtn-budget") >= 2 * 3
    assert "1 int4-g32, 1 int8-g128" in md
    assert "Size-budget curves" in html_page(rows, png, [], [], None)
    # a mix's linear bits/weight: without its manifest's weights per choice, none; with them, their weighted mean
    assert sweep[0].linear_bits_per_weight is None
    from phi3_export.report.records import linear_bits

    mixed = linear_bits(sweep[0].settings, "onnx", "cpu", {"int4-g32": 3_000_000, "int8-g128": 1_000_000})
    assert mixed == (3 * (4 + 32 / 32) + 1 * (8 + 32 / 128)) / 4  # fp32 scales on cpu, symmetric: no zero points
    assert linear_bits(sweep[0].settings, "onnx", "dml", {"int4-g32": 1, "fp16": 1}) == (4 + 16 / 32 + 16) / 2
    # one point alone is no curve
    _, single = render_plot(sweep[:1] + [lone])
    assert single["curves"] == []
