"""Accuracy per byte: our methods and size budgets against every other tool, measured in one run.

Checkpoints:
- SmolLM2-135M-Instruct in Phi-3 layout (real weights; `phi3_export/fixtures/smollm2.py`). Its
  weights come from a Q4_1 GGUF, so every linear already sits on an asymmetric 4-bit grid of
  block 32 with a per-block minimum: a method quantizing at g32 asymmetric would recover it
  almost exactly, so we compare at g128 asymmetric and g32 symmetric, where that grid does
  not line up (the results say where it may still flatter a method).
- a tiny Phi-3 trained here on the corpus' train part (`phi3-export fixture --train-steps`).

Texts: the corpus' eval part (never calibration), and for SmolLM2 a larger held-out text
(the eval part followed by the train part, which only ever trained our tiny fixtures;
``--held-out-tokens``, default 8,192). The tiny fixture was trained on the train part, so
it is scored on the eval part only.

Figures per artifact (validate/accuracy.py's Comparison, against our fp32 export of the same
checkpoint, windows of ``--window`` tokens): mean KL divergence (the ranking figure), top-1
agreement, perplexity; and the ONNX model's size (model.onnx + data).

Peers, each checked to have produced what was asked (the builder ignores some documented
aliases without a word): the ORT-GenAI builder's int4 default (block 32, symmetric, RTN) and
its int8 mixes (k_quant with the LM head int8, and with llama.cpp's "mixed layers" int8);
onnxruntime's `matmul_nbits_quantizer` on our fp32 export with rtn, hqq, k_quant and gptq.
All at accuracy level 1 (fp32 compute): the weights are measured, not int8 activations.

Usage: python benchmarks/bench_quality.py [--fixture smollm2,tiny] [--only NAME,...] [--reuse]
Writes build/bench/bench_quality.json (one entry per fixture).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phi3_export.memory import run_measured

Q4 = ("--bits", "4", "--accuracy-level", "1")
G128A, G32S = ("--block-size", "128", "--asymmetric"), ("--block-size", "32", "--symmetric")
OUR_METHODS = ("rtn", "awq", "gptq", "awq-gptq")
BUDGET_POINTS = 5
PEERS_ON_CURVE = ("builder_int4_default",)  # the size target the issue names; the int8 mixes sit between even budgets


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def _matmul_nbits(folder: Path) -> dict:
    """(bits, block_size) -> count of MatMulNBits/GatherBlockQuantized nodes: what an export really holds."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: a.i for a in node.attribute}
            key = f"{node.op_type}:{attrs.get('bits', 4)}b/g{attrs.get('block_size')}"
            counts[key] = counts.get(key, 0) + 1
        elif node.op_type == "MatMul" and any(i.endswith("weight") or "MatMul" in i for i in node.input[1:]):
            counts["MatMul(float)"] = counts.get("MatMul(float)", 0) + 1
    return counts


class Runner:
    """Runs an export once under the memory sampler; ``reuse`` keeps an earlier run's output and figures."""

    def __init__(self, work: Path, reuse: bool):
        self.work, self.reuse = work, reuse

    def run(self, name: str, cmd: list[str], artifact: Path) -> dict:
        record = self.work / f"{name}.run.json"
        if self.reuse and record.is_file() and (artifact / "model.onnx").is_file():
            return json.loads(record.read_text())
        r = run_measured(cmd)
        if r.returncode:
            return {"error": r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else f"exit {r.returncode}"}
        figures = {"wall_s": round(r.wall_s, 1), "peak_rss_anon_mb": round(r.peak_rss_anon_mb), "dir": str(artifact)}
        record.write_text(json.dumps(figures))
        return figures

    def ours(self, ckpt: Path, name: str, *flags: str) -> dict:
        out = self.work / name
        cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--target", "cpu",
               "--quiet", "--force", *flags]
        return self.run(name, cmd, out / "onnx-cpu")

    def builder(self, ckpt: Path, name: str, *extra: str, expect: set[str]) -> dict:
        out = self.work / name
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out), "-p", "int4", "-e", "cpu",
               "-c", str(out) + "-cache", "--extra_options", "accuracy_level=1", *extra]
        result = self.run(name, cmd, out)
        if "error" not in result:
            got = set(_matmul_nbits(out))
            if not expect <= got:  # the options asked for did not take effect: not the point we meant to measure
                return {"error": f"builder graph holds {sorted(got)}, expected {sorted(expect)}"}
        return result

    def nbits(self, fp32: Path, name: str, algo: str, block: int, symmetric: bool, calibration: list[list[int]]) -> dict:
        """onnxruntime's own int4 quantizer on our fp32 export (the same graph, its weights requantized)."""
        out = self.work / name
        record = self.work / f"{name}.run.json"
        if self.reuse and record.is_file() and (out / "model.onnx").is_file():
            return json.loads(record.read_text())
        started = time.perf_counter()
        try:
            _nbits_quantize(fp32, out, algo, block, symmetric, calibration)
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported as "not run", with its reason
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        figures = {"wall_s": round(time.perf_counter() - started, 1), "dir": str(out)}
        record.write_text(json.dumps(figures))
        return figures


def _nbits_quantize(fp32: Path, out: Path, algo: str, block: int, symmetric: bool, calibration: list[list[int]]) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(str(fp32 / "model.onnx"))
    if algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    elif algo == "k_quant":
        config = mnq.KQuantWeightOnlyQuantConfig()
    elif algo == "gptq":
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(fp32, calibration), block_size=block)
    else:
        config = mnq.RTNWeightOnlyQuantConfig()
    quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric, accuracy_level=1, algo_config=config)
    quantizer.process()
    onnx.save_model(quantizer.model.model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def _Reader(folder: Path, windows: list[list[int]]):
    """Calibration feeds for onnxruntime's GPTQ (a CalibrationDataReader): a prefill of each window from an empty cache."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = _feeds(folder, windows)
            self._it = iter(self.feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.feeds)

    return Reader()


def _feeds(folder: Path, windows: list[list[int]]) -> list[dict]:
    from phi3_export.validate.ort_decoder import OrtDecoder

    decoder = OrtDecoder(folder, threads=2)
    return [{**decoder.token_inputs(np.asarray(ids, dtype=np.int64)[None, :]), "attention_mask": np.ones((1, len(ids)), np.int64),
             **decoder.empty_cache()} for ids in windows]


_REFERENCE: dict[tuple[str, int, int], np.ndarray] = {}  # (reference folder, window start, length) -> logits


def _window_logits(decoder, ids: list[int], window: int, cache_key: str | None = None):
    from phi3_export.validate.accuracy import windows

    arr = np.asarray(ids)
    for start, _first in windows(len(ids), window, window):
        seq = arr[start : start + window + 1]
        key = (cache_key, start, len(seq))
        if cache_key and key in _REFERENCE:
            yield _REFERENCE[key]
            continue
        out, _ = decoder.step(seq[None, :-1], decoder.empty_cache())
        if cache_key:  # the reference's logits, computed once for every artifact scored against it
            _REFERENCE[key] = out[0]
        yield out[0]


def score(folder: Path, reference: Path, texts: dict[str, list[int]], window: int) -> dict:
    """Mean KLD, top-1 agreement, perplexity per text, against the fp32 export, windows of ``window``."""
    from phi3_export.validate.accuracy import compare_windows
    from phi3_export.validate.ort_decoder import OrtDecoder

    ref, art = OrtDecoder(reference, threads=2), OrtDecoder(folder, threads=2)
    figures = {"size_bytes": _model_bytes(folder), "graph": _matmul_nbits(folder)}
    for name, ids in texts.items():
        s = compare_windows(ids, _window_logits(ref, ids, window, str(reference)), _window_logits(art, ids, window), window, window)
        figures[name] = {"kld_mean": round(s["kld_mean"], 5), "top1": round(s["top1_agreement"], 4),
                         "ppl": round(s["perplexity_artifact"], 4), "ppl_reference": round(s["perplexity_reference"], 4),
                         "tokens": s["positions"]}
    return figures


def budgets_between(low: int, high: int, n: int) -> list[int]:
    """``n`` budgets from just above ``low`` (all int4-g128) to ``high`` (all int8), evenly spaced."""
    return [int(low * 1.002 + (high - low * 1.002) * k / (n - 1)) for k in range(n)]


def run_fixture(name: str, ckpt: Path, texts: dict[str, list[int]], calibration: list[list[int]], args) -> dict:
    runner = Runner(args.out / "quality-work" / name, args.reuse)
    runner.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    fp32 = runner.ours(ckpt, "fp32", "--bits", "32")
    reference = Path(fp32["dir"])
    plan: dict[str, callable] = {}
    for method in OUR_METHODS:
        m = ("--method", method)
        plan[f"{method}_w4g128a"] = lambda m=m: runner.ours(ckpt, f"{m[1]}_g128a", *Q4, *G128A, *m)
        plan[f"{method}_w4g32s"] = lambda m=m: runner.ours(ckpt, f"{m[1]}_g32s", *Q4, *G32S, *m)
        # the same with an int4 table (tied models keep it int8 by default): no larger than the builder's default
        plan[f"{method}_w4g32s_int4_table"] = lambda m=m: runner.ours(ckpt, f"{m[1]}_g32s_t4", *Q4, *G32S, *m, "--lm-head", "int4")
    # the size-budget curve's ends: every choosable tensor int4-g128, and int8
    plan["rtn_all_int4_g128a"] = lambda: runner.ours(ckpt, "rtn_all4", *Q4, *G128A, "--lm-head", "int4")
    plan["rtn_w8g128a"] = lambda: runner.ours(ckpt, "rtn_w8", "--bits", "8", "--accuracy-level", "1", *G128A)
    plan["builder_int4_default"] = lambda: runner.builder(ckpt, "builder_int4", "block_size=32", "is_symmetric=true",
                                                          expect={"MatMulNBits:4b/g32"})
    plan["builder_k_quant_last_int8"] = lambda: runner.builder(
        ckpt, "builder_kq_last", "block_size=32", "algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8",
        expect={"MatMulNBits:4b/g32", "MatMulNBits:8b/g32"})
    plan["builder_k_quant_mixed_int8"] = lambda: runner.builder(
        ckpt, "builder_kq_mixed", "block_size=32", "algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",
        expect={"MatMulNBits:4b/g32", "MatMulNBits:8b/g32"})
    for algo in ("rtn", "hqq", "k_quant", "gptq"):
        plan[f"ort_nbits_{algo}_g128a"] = lambda a=algo: runner.nbits(reference, f"ort_{a}_g128a", a, 128, False, calibration)
        plan[f"ort_nbits_{algo}_g32s"] = lambda a=algo: runner.nbits(reference, f"ort_{a}_g32s", a, 32, True, calibration)

    rows: dict[str, dict] = {}
    for key, make in plan.items():
        if only and key not in only and not key.startswith("rtn_all") and key != "rtn_w8g128a":
            continue
        started = time.perf_counter()
        made = make()
        rows[key] = made if "error" in made else {**{k: v for k, v in made.items() if k != "dir"},
                                                   **score(Path(made["dir"]), reference, texts, args.window)}
        print(key, json.dumps(rows[key]), f"({time.perf_counter() - started:.0f} s)", flush=True)

    # the budget curve, for each method asked for, between the two ends measured above
    low, high = rows["rtn_all_int4_g128a"].get("size_bytes"), rows["rtn_w8g128a"].get("size_bytes")
    budgets = budgets_between(low, high, BUDGET_POINTS) if low and high else []
    # and one budget at each peer's size inside the range, so "dominates" is read at equal size
    earlier = {**args.earlier_runs, **rows}
    budgets = sorted({*budgets, *(earlier[k]["size_bytes"] for k in PEERS_ON_CURVE
                                  if k in earlier and low and high and low < earlier[k].get("size_bytes", 0) < high)})
    if args.budgets:  # an explicit list (e.g. to leave out points a slow method need not repeat)
        budgets = [int(b) for b in args.budgets.split(",")]
    curve: dict[str, list[dict]] = {}
    for method in filter(None, args.budget_methods.split(",")):
        for budget in budgets:
            key = f"{method}_budget_{budget}"
            made = runner.ours(ckpt, key, *Q4, "--asymmetric", "--method", method, "--size-budget", str(budget))
            point = made if "error" in made else {**{k: v for k, v in made.items() if k != "dir"},
                                                   **score(Path(made["dir"]), reference, texts, args.window)}
            point["budget_bytes"] = budget
            curve.setdefault(method, []).append(point)
            print(key, json.dumps(point), flush=True)
    return {"checkpoint": str(ckpt), "texts": {k: len(v) for k, v in texts.items()}, "window": args.window,
            "runs": rows, "budget_curve": curve, "verdicts": verdicts(rows, curve, list(texts))}


def verdicts(rows: dict, curve: dict, texts: list[str]) -> dict:
    """The issue's targets, each as measured (None where a run failed)."""
    def kld(row: dict | None, text: str):
        return (row or {}).get(text, {}).get("kld_mean")

    ours = [k for k in rows if k.split("_")[0] in OUR_METHODS and "all4" not in k and "w8" not in k and "all_int4" not in k]
    peers = [k for k in rows if k.startswith(("builder_", "ort_nbits_"))] + ours
    out = {}
    for text in texts:
        rtn = kld(rows.get("rtn_w4g128a"), text)
        g128 = [(kld(rows.get(f"{m}_w4g128a"), text), m) for m in OUR_METHODS if kld(rows.get(f"{m}_w4g128a"), text) is not None]
        if rtn and g128:
            best = min(g128)
            out[f"{text}: best g128a method's KLD / RTN's (target <= 0.4)"] = {"method": best[1], "ratio": round(best[0] / rtn, 3)}
        builder = rows.get("builder_int4_default", {})
        cap, builder_kld = builder.get("size_bytes"), kld(builder, text)
        if cap and builder_kld:
            fits = [(kld(rows[k], text), k) for k in ours if rows[k].get("size_bytes", cap + 1) <= cap and kld(rows[k], text)]
            fits += [(kld(pt, text), f"{m} budget {pt['budget_bytes']}") for m, pts in curve.items() for pt in pts
                     if pt.get("size_bytes", cap + 1) <= cap and kld(pt, text)]
            if fits:
                best = min(fits)
                out[f"{text}: best of ours at <= the builder default's size, KLD / builder's (target <= 0.35)"] = {
                    "ours": best[1], "ratio": round(best[0] / builder_kld, 3)}
        for method, pts in curve.items():
            points = [(pt["size_bytes"], kld(pt, text)) for pt in pts if kld(pt, text) is not None]
            verdict = {}
            for k in peers:
                size, value = rows[k].get("size_bytes"), kld(rows[k], text)
                if size is None or value is None:
                    continue
                if any(s <= size and v <= value for s, v in points):
                    verdict[k] = "dominated"
                elif points and size < min(s for s, _ in points):
                    verdict[k] = "smaller than the curve's smallest budget"
                else:
                    verdict[k] = "NOT dominated"
            out[f"{text}: {method} budget curve vs each peer"] = verdict
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--fixture", default="smollm2,tiny")
    ap.add_argument("--only", help="comma-separated run names (the curve's ends always run)")
    ap.add_argument("--budget-methods", default="gptq", help="methods drawn as a size-budget curve")
    ap.add_argument("--budgets", help="comma-separated budgets in bytes instead of the even ones and the peers' sizes")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--held-out-tokens", type=int, default=8192)
    ap.add_argument("--reuse", action="store_true", help="reuse exports (and their measured time/memory) from an earlier run")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from phi3_export.fixtures.corpus import corpus_text

    path = args.out / "bench_quality.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"schema_version": 1}
    for name in args.fixture.split(","):
        if name == "smollm2":
            from phi3_export.fixtures.smollm2 import smollm2_checkpoint

            ckpt = smollm2_checkpoint(REPO / "build" / "fixtures")
        else:
            ckpt = REPO / "build" / "fixtures" / "tiny-trained"
            if not (ckpt / "config.json").is_file():
                subprocess_fixture(ckpt)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        ids = tokenizer(corpus_text("eval")).input_ids
        texts = {"eval": ids}
        if name == "smollm2":
            texts["held_out"] = (ids + tokenizer(corpus_text("train")).input_ids)[: args.held_out_tokens]
        calib = tokenizer(corpus_text("calibration")).input_ids
        calibration = [calib[i : i + 256] for i in range(0, min(len(calib) - 256, 8 * 256), 256)]
        earlier = doc.get(name, {}) if args.reuse else {}
        args.earlier_runs = earlier.get("runs", {})
        doc[name] = run_fixture(name, ckpt, texts, calibration, args)
        # a partial run (--only) keeps the other runs' figures from the earlier one
        doc[name]["runs"] = {**earlier.get("runs", {}), **doc[name]["runs"]}
        doc[name]["budget_curve"] = {**earlier.get("budget_curve", {}), **doc[name]["budget_curve"]}
        doc[name]["verdicts"] = verdicts(doc[name]["runs"], doc[name]["budget_curve"], list(texts))
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc[name]["verdicts"], indent=1))
    print(f"wrote {path}")


def subprocess_fixture(out: Path) -> None:
    import subprocess

    subprocess.run([sys.executable, "-m", "phi3_export", "fixture", "--recipe", "phi-3-mini-4k", "--layers", "4", "--hidden", "256",
                    "--train-steps", "400", "--out", str(out), "--force", "--quiet"], check=True)


if __name__ == "__main__":
    main()
