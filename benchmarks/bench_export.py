"""`make bench`: our streamed RTN export against the ONNX Runtime GenAI builder's int4, in one run.

1. Speed/memory: a random-weight checkpoint with Phi-3-mini's real widths (fewer layers so the
   builder, which holds the whole model, fits): export wall time and peak memory of both tools,
   then prefill/decode tokens/s and time to first token of both artifacts through
   onnxruntime-genai (median of 5 after a warm-up, runs interleaved).
2. Accuracy: a briefly trained tiny fixture; perplexity of fp32, our int4 and the builder's int4
   on the corpus' eval part (never trained on).
Same block size, symmetry and accuracy level for both tools. JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phi3_export.machine import machine
from phi3_export.memory import run_measured
from phi3_export.validate.speed import timed_generation
from phi3_export.versions import library_versions, tool_version


def export_ours(ckpt: Path, out: Path, block: int, level: int) -> dict:
    cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--bits", "4",
           "--target", "cpu", "--block-size", str(block), "--symmetric", "--accuracy-level", str(level), "--quiet"]
    r = run_measured(cmd)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return {"wall_s": round(r.wall_s, 2), "peak_rss_anon_mb": round(r.peak_rss_anon_mb), "peak_rss_mb": round(r.peak_rss_mb),
            "artifact": str(out / "onnx-cpu")}


def export_builder(ckpt: Path, out: Path, block: int, level: int, precision: str = "int4") -> dict:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out) + "-cache", "--extra_options", f"block_size={block}",
           f"accuracy_level={level}", "is_symmetric=true"]
    r = run_measured(cmd)
    shutil.rmtree(str(out) + "-cache", ignore_errors=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return {"wall_s": round(r.wall_s, 2), "peak_rss_anon_mb": round(r.peak_rss_anon_mb), "peak_rss_mb": round(r.peak_rss_mb),
            "artifact": str(out)}


def size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).glob("model.onnx*")) / 1e6, 1)


def one_run(model, prompt_len: int, new_tokens: int) -> dict:
    ids = np.random.RandomState(0).randint(10, 900, prompt_len).tolist()
    return timed_generation(model, ids, new_tokens)


def load_model(path: str, threads: int = 0):
    """onnxruntime-genai model; ``threads`` > 0 sets intra_op_num_threads (0: onnxruntime's default)."""
    import onnxruntime_genai as og

    config = og.Config(path)
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def speeds(artifacts: dict[str, str], prompt_len: int, new_tokens: int, repeats: int, threads: int = 0) -> dict:
    models = {name: load_model(path, threads) for name, path in artifacts.items()}
    runs = {name: [] for name in models}
    for name, model in models.items():
        one_run(model, prompt_len, new_tokens)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():  # interleaved: drift on a noisy machine hits both
            runs[name].append(one_run(model, prompt_len, new_tokens))
    out = {}
    for name, rs in runs.items():
        out[name] = {}
        for key in ("prefill_tps", "decode_tps", "ttft_s"):
            values = [r[key] for r in rs]
            out[name][key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}
    return out


def accuracy(work: Path, block: int, level: int, train_steps: int) -> dict:
    from transformers import AutoTokenizer

    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes import load_recipe
    from phi3_export.validate.ort_decoder import OrtDecoder, perplexity

    ckpt = work / "trained"
    make_fixture(load_recipe("phi-3-mini-4k"), ckpt, layers=4, hidden=256, train_steps=train_steps)
    ids = AutoTokenizer.from_pretrained(ckpt)(corpus_text("eval")).input_ids
    import subprocess

    subprocess.run([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(work / "fp32"),
                    "--bits", "32", "--target", "cpu", "--quiet"], check=True)
    results = {"fp32": perplexity(OrtDecoder(work / "fp32" / "onnx-cpu"), ids)}
    for sym, flag in (("s", "--symmetric"), ("a", "--asymmetric")):
        for g in (32, 128):
            out = work / f"ours-g{g}{sym}"
            subprocess.run([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out),
                            "--bits", "4", "--target", "cpu", "--block-size", str(g), flag, "--accuracy-level", str(level),
                            "--quiet"], check=True)
            results[f"ours_rtn_w4g{g}{sym}"] = perplexity(OrtDecoder(out / "onnx-cpu"), ids)
    builder = work / "builder-int4"
    export_builder(ckpt, builder, block, level)
    results[f"builder_int4_g{block}s"] = perplexity(OrtDecoder(builder), ids)
    return {"checkpoint": "phi-3-mini-4k fixture, 4 layers, hidden 256, trained", "train_steps": train_steps,
            "eval_tokens": len(ids), "window": 256, "perplexity": {k: round(v, 4) for k, v in results.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the mini-width checkpoint")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=600)
    args = ap.parse_args()

    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from phi3_export.fixtures.full_size import write_full_size
    from phi3_export.recipes import load_recipe

    ckpt = work / "mini-width"
    write_full_size(load_recipe("phi-3-mini-4k"), ckpt, layers=args.layers)
    print(f"checkpoint: Phi-3-mini widths, {args.layers} layers (random bf16)", flush=True)
    ours = export_ours(ckpt, work / "ours", args.block_size, args.accuracy_level)
    print("ours:", ours, flush=True)
    builder = export_builder(ckpt, work / "builder", args.block_size, args.accuracy_level)
    print("builder:", builder, flush=True)
    speed = speeds({"ours": ours["artifact"], "builder": builder["artifact"]}, args.prompt_len, args.new_tokens, args.repeats)
    print("speed:", speed, flush=True)
    acc = accuracy(work, args.block_size, args.accuracy_level, args.train_steps)
    print("accuracy:", acc, flush=True)

    def ratio(key: str) -> float:
        return round(speed["ours"][key]["median"] / speed["builder"][key]["median"], 3)

    result = {
        "schema_version": 1,
        "tool_version": tool_version(),
        "versions": library_versions(),
        "machine": machine(),
        "settings": {"bits": 4, "block_size": args.block_size, "symmetric": True, "accuracy_level": args.accuracy_level,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "checkpoint": {"shape": "phi-3-mini-4k widths", "layers": args.layers},
        "export": {"ours": {**ours, "size_mb": size_mb(Path(ours["artifact"]))},
                   "builder": {**builder, "size_mb": size_mb(Path(builder["artifact"]))},
                   "ratio_wall_ours_over_builder": round(ours["wall_s"] / builder["wall_s"], 3),
                   "ratio_peak_anon_ours_over_builder": round(ours["peak_rss_anon_mb"] / builder["peak_rss_anon_mb"], 3)},
        "speed": {**speed, "ratio_ours_over_builder": {k: ratio(k) for k in ("prefill_tps", "decode_tps")}},
        "accuracy": acc,
    }
    path = args.out / "bench_export.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
