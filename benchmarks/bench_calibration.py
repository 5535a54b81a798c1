"""Calibration cost: where a full-width layer's time goes, and AWQ / GPTQ at full depth.

Modes (results merge into build/bench/bench_calibration.json under ``--label``, so a run
before a change and one after sit side by side):

  (default) layer split  AWQ on ``--layers`` full-width Phi-3-mini layers (random bf16
                         checkpoint from fixtures/full_size.py, 32 heads / 32 KV heads,
                         hidden 3072, intermediate 8192, vocab 32064), timed as capture
                         forward / each scaling group's search / each linear's clip search /
                         store, in a child process whose peak anonymous RSS is sampled
                         (memory.run_measured). Weights are random, so only time and memory
                         mean anything here, not the chosen alphas.
  --full-depth           `phi3-export quantize --method M` for each M of ``--methods`` on a
                         32-layer full Phi-3-mini-shape random checkpoint, under run_measured:
                         wall time and peak anonymous RSS (about an hour each: not run by CI;
                         run it alone on the machine).

What the cheaper searches choose against the exhaustive ones: bench_calibration_choices.py.
Accuracy per method and size: bench_quality.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from calibration_common import OLD_SEARCH, OUT, RECIPE, WORK, Stopwatch, awq_options, full_size_checkpoint, merge_result

from phi3_export.memory import run_measured

QFLAGS = ("--bits", "4", "--block-size", "128", "--asymmetric", "--accuracy-level", "1", "--target", "cpu")


def layer_split_child(ckpt: Path, out: Path, overrides: dict, layers: int) -> None:
    """In a child process: AWQ on the first ``layers`` layers, every step timed; JSON to ``out``."""
    import torch

    from phi3_export.arch import architecture
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.stream import embedded, load_tensors, stream_layers
    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.memory import bound_heap, self_rss_anon_mb
    from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
    from phi3_export.quant.settings import QuantSettings
    from phi3_export.quant.store import group_name, store_weights

    bound_heap()  # as the CLI does
    from phi3_export.quant import awq as loop
    from phi3_export.quant.calibrate import calibration_tokens, capture_inputs

    options = awq_options({k: v for k, v in overrides.items() if not k.startswith("_")})
    ckpt_ = Checkpoint(ckpt)
    arch = architecture(ckpt_.config["architectures"][0])
    plan = arch.plan(ckpt_.config)
    settings = QuantSettings(bits=4, method="awq", block_size=128, symmetric=False, accuracy_level=1)
    tokens = calibration_tokens(ckpt_, corpus_text("calibration"), options)
    extra = arch.calibration_inputs(ckpt_.config, options.seqlen)
    x = embedded(ckpt_, plan.decoder, tokens)
    rows, calls = [], []
    real_scale, real_clip = loop.search_scale, loop.search_clip

    def timed_scale(group, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        r = real_scale(group, *a, **k)
        calls.append(("scale " + group.label, time.perf_counter() - t0, time.process_time() - c0))
        return r

    def timed_clip(xc, w, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        r = real_clip(xc, w, *a, **k)
        clipped = sum(name.startswith("clip") for name, _, _ in calls)  # linears in layer.linears() order
        calls.append((f"clip {clipped}: {tuple(w.shape)} x {xc.shape[0]} tokens", time.perf_counter() - t0,
                      time.process_time() - c0))
        return r

    if overrides.get("_old_search"):  # every alpha on every token handed to the search, as before this change
        from phi3_export.quant import awq_search

        awq_search.SCORED_TOKENS = awq_search.SCREENED_TOKENS = 1 << 30
        awq_search.SCREEN_KEEP = 0
    loop.search_scale, loop.search_clip = timed_scale, timed_clip
    with tempfile.TemporaryDirectory() as tmp:
        writer = QuantizedCheckpointWriter(Path(tmp), {"config": ckpt_.config})
        for layer in stream_layers(ckpt_, plan.decoder.layers[:layers]):
            calls.clear()
            row: dict = {"layer": layer.index}
            step = Stopwatch()
            weights = load_tensors(ckpt_, layer.tensors())
            module = arch.loaded_layer(ckpt_.config, layer, weights)
            row["load"] = step.lap()
            inputs, y = capture_inputs(module, layer, x, extra)
            row["capture"] = step.lap()
            done = loop.awq_layer(weights, inputs, layer, settings, options, seed=options.seed + layer.index, module=module,
                                  extra=extra)
            row["awq_layer"] = step.lap()
            row["searches"] = {name: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for name, w, c in calls}
            for kind in ("scale", "clip"):
                row[f"{kind}_total"] = {"wall_s": round(sum(w for n, w, _ in calls if n.startswith(kind)), 2),
                                        "cpu_s": round(sum(c for n, _, c in calls if n.startswith(kind)), 2)}
            row["alphas"] = done.alphas
            del inputs, module
            for group, blocks in layer.tensor_groups():
                store_weights(writer, blocks, weights, ckpt_, settings)
                writer.flush(group_name(layer, group))
            row["store"] = step.lap()
            row["layer_total"] = step.total()
            row["rss_anon_mb_after"] = round(self_rss_anon_mb())
            x = y
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "layers": rows}))


def layer_split(args) -> dict:
    ckpt = full_size_checkpoint(args.work, args.layers)
    overrides = {**OLD_SEARCH, "_old_search": True} if args.old_search else json.loads(args.options)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "split.json"
        cmd = [sys.executable, __file__, "--_child", str(ckpt), str(out), json.dumps(overrides), str(args.layers)]
        r = run_measured(cmd)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        child = json.loads(out.read_text())
    load = os.getloadavg()
    return {"shape": f"{RECIPE} full widths, {args.layers} layer(s), random bf16", "options": overrides,
            "settings": "w4 g128 asym", "wall_s": round(r.wall_s, 1), "peak_rss_anon_mb": round(r.peak_rss_anon_mb),
            "torch_threads": child["threads"], "loadavg_1min_at_end": round(load[0], 2), "layers": child["layers"]}


def full_depth(args) -> dict:
    """Each method on all 32 layers at full size: wall time and peak anonymous RSS (hours)."""
    ckpt = full_size_checkpoint(args.work, 32)
    rows = {}
    for method in args.methods.split(","):
        out = args.work / f"full-depth-{method}"
        cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--quiet",
               "--force", *QFLAGS, "--method", method]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = run_measured(cmd)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        rows[method] = {"returncode": r.returncode, "wall_s": round(r.wall_s, 1), "wall_s_per_layer": round(r.wall_s / 32, 1),
                        "cpu_s": round(cpu_s, 1), "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
                        "peak_rss_anon_mb": round(r.peak_rss_anon_mb), "peak_rss_mb": round(r.peak_rss_mb),
                        **({"stderr_tail": r.stderr[-1500:]} if r.returncode else {})}
        print(method, rows[method], flush=True)
        if not args.keep:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    return {"shape": f"{RECIPE} full size, 32 layers, random bf16", "targets": {"wall_s": 3600, "peak_rss_anon_mb": 4000},
            "runs": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        layer_split_child(Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--label", default="current", help="key the results are stored under (e.g. before, after)")
    ap.add_argument("--full-depth", action="store_true")
    ap.add_argument("--layers", type=int, default=1, help="layer split: full-width decoder layers to run")
    ap.add_argument("--options", default="{}", help="layer split: AwqOptions fields as JSON")
    ap.add_argument("--old-search", action="store_true", help="layer split: the exhaustive searches the cheaper ones replaced")
    ap.add_argument("--methods", default="awq,gptq", help="full depth: methods, one after another")
    ap.add_argument("--keep", action="store_true", help="full depth: keep the outputs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.full_depth:
        merge_result(args.out, "full_depth", args.label, full_depth(args))
    else:
        result = layer_split(args)
        merge_result(args.out, "layer_split", args.label, result)
        print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
