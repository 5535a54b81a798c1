"""Size-budgeted mixed precision: does the measured choice beat naive ones at the same size?

For each checkpoint (default: the trained tiny fixture and SmolLM2-135M in Phi-3 layout):

1. an fp32 ONNX export is the reference; every other artifact's mean per-token KL divergence
   from it is measured with onnxruntime (OrtDecoder, 2 threads) over non-overlapping windows of
   the corpus' eval part (calibration never sees it);
2. uniform mixes over the choosable tensors (all int4-g128 = the smallest, all int4-g32, all
   int8-g128) give the size range;
3. at budgets spread over that range, ``quantize --size-budget B`` (the measured choice) is
   compared with a naive mix at the same budget: start from all int4-g128 and upgrade tensors in
   graph order (embedding, layers, LM head) to int4-g32 wherever the upgrade still fits, then,
   with room left, to int8-g128 the same way. Both are checked to fit the budget exactly.

    python benchmarks/bench_budget.py                       # both checkpoints -> build/bench/bench_budget.json
    python benchmarks/bench_budget.py --checkpoint build/fixtures/smollm2-135m-phi3 --budgets 0.2,0.5,0.8
    python benchmarks/bench_budget.py --cost /tmp/mini2     # + sensitivity-pass seconds per full-width layer

``--cost DIR`` times the sensitivity pass on a full-width checkpoint (e.g. ``phi3-export fixture
--recipe phi-3-mini-4k --full-size --random --layers 2 --out DIR``): wall and CPU seconds per layer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phi3_export.api import choose_recipe, quantize
from phi3_export.checkpoint import Checkpoint
from phi3_export.checkpoint.check import checked_architecture
from phi3_export.export.onnx.sizes import decoder_file_bytes
from phi3_export.export.onnx.targets import resolve_target
from phi3_export.fixtures.corpus import corpus_text
from phi3_export.quant.budget import Budget, choosable_tensors, plan_budget
from phi3_export.quant.settings import QuantSettings

OUT = REPO / "build" / "bench"
WORK = OUT / "budget-work"
TINY = OUT / "budget-fixtures" / "tiny-trained"
SMOLLM2 = REPO / "build" / "fixtures" / "smollm2-135m-phi3"
WINDOW = 256


def tiny_fixture() -> Path:
    if not (TINY / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "phi3_export", "fixture", "--recipe", "phi-3-mini-4k", "--train-steps", "150",
                        "--out", str(TINY), "--force", "--quiet"], check=True)
    return TINY


# ---- KL against the fp32 export -------------------------------------------------------------------


def eval_windows(checkpoint: Path, limit: int) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(corpus_text("eval")).ids
    return [np.asarray(ids[s : s + WINDOW]) for s in range(0, len(ids) - WINDOW + 1, WINDOW)][:limit]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def artifact_logprobs(folder: Path, windows: list[np.ndarray]) -> list[np.ndarray]:
    from phi3_export.validate.ort_decoder import OrtDecoder

    decoder = OrtDecoder(folder, threads=2)
    return [log_softmax(decoder.step(w[None], decoder.empty_cache())[0][0]) for w in windows]


def kl_stats(reference: list[np.ndarray], folder: Path, windows: list[np.ndarray]) -> dict:
    kls, top1 = [], []
    for ref, art in zip(reference, artifact_logprobs(folder, windows)):
        kls.append((np.exp(ref) * (ref - art)).sum(-1))
        top1.append(ref.argmax(-1) == art.argmax(-1))
    k = np.concatenate(kls)
    return {"kld_mean": float(k.mean()), "kld_p99": float(np.quantile(k, 0.99)), "top1": float(np.concatenate(top1).mean()),
            "positions": int(k.size)}


# ---- mixes ------------------------------------------------------------------------------------------


class Sizes:
    """Costs of the choosable tensors and the fixed part, for the naive mixes (quant/budget.py's own numbers)."""

    def __init__(self, checkpoint: Path):
        ckpt = Checkpoint(checkpoint)
        arch = checked_architecture(ckpt)
        facts = arch.facts_from_config(ckpt.config, ckpt.tokenizer_kind)
        self.plan = arch.plan(ckpt.config)
        recipe = choose_recipe(ckpt, facts, None).recipe
        settings = QuantSettings.from_recipe(recipe.quantization, bits=4, method="rtn")
        target = resolve_target("cpu", recipe, 4, settings.accuracy_level, None)
        self.bplan = plan_budget(ckpt, self.plan, settings, [target], Budget(1 << 50, None, "bench"))
        self.items = choosable_tensors(self.plan, settings)
        self.costs = self.bplan.costs["cpu"]
        self.fixed = self.bplan.fixed["cpu"]

    def index(self, label: str, item) -> int:
        return [s.label for s in item.candidates].index(label)

    def uniform(self, label: str) -> dict[str, str]:
        return {item.name: label for item in self.items}

    def size(self, mix: dict[str, str]) -> int:
        return self.fixed + sum(self.costs[i][self.index(mix[item.name], item)] for i, item in enumerate(self.items))

    def naive(self, budget: int) -> dict[str, str]:
        """All int4-g128, then upgrades in graph order wherever they fit: int4-g32 first, then int8-g128."""
        mix = self.uniform("int4-g128")
        for label in ("int4-g32", "int8-g128"):
            for item in self.items:
                trial = {**mix, item.name: label}
                if self.size(trial) <= budget:
                    mix = trial
        return mix


def export(checkpoint: Path, out: Path, **kwargs) -> dict:
    if out.exists():
        shutil.rmtree(out)
    started = time.time()
    manifest = quantize(checkpoint, out, targets=("cpu",), **kwargs)
    return {"manifest": manifest, "folder": out / "onnx-cpu", "wall_s": round(time.time() - started, 1)}


def bench_checkpoint(checkpoint: Path, fractions: list[float], windows_limit: int, method: str, reuse: bool) -> dict:
    """``reuse``: artifacts whose outcome does not depend on the sensitivities (fp32, uniform and
    naive mixes) and their figures are kept from an earlier run with the same arguments."""
    name = checkpoint.name
    work = WORK / name
    sizes = Sizes(checkpoint)
    windows = eval_windows(checkpoint, windows_limit)
    reference = None
    rows = {}

    def measure(key: str, folder: Path, extra: dict | None = None, **kwargs) -> dict:
        nonlocal reference
        record = folder.with_name(folder.name + ".bench.json")
        args = json.loads(json.dumps({"kwargs": kwargs, "windows": len(windows)}, default=str))
        cached = json.loads(record.read_text()) if record.is_file() else {}
        if reuse and cached.get("args") == args and "size_budget" not in kwargs:
            rows[key] = cached["row"]
        else:
            result = export(checkpoint, folder, **kwargs)
            if reference is None:
                reference = artifact_logprobs(export(checkpoint, work / "fp32", bits=32)["folder"], windows)
            rows[key] = {"decoder_bytes": decoder_file_bytes(result["folder"]), "wall_s": result["wall_s"],
                         **kl_stats(reference, result["folder"], windows)}
            if "size_budget" in kwargs:
                block = result["manifest"]["size_budget"]
                rows[key].update(counts=block["counts"], predicted_bytes=block["predicted_bytes"]["cpu"],
                                 predicted_kld=block["sensitivity_sum"])
            record.write_text(json.dumps({"args": args, "row": rows[key]}))
        rows[key].update(extra or {})
        print(f"{name} {key}: {rows[key]['decoder_bytes'] / 1e6:.3f} MB, KLD {rows[key]['kld_mean']:.5f}", flush=True)
        return rows[key]

    uniform = {label: sizes.uniform(label) for label in ("int4-g128", "int4-g32", "int8-g128")}
    for label, mix in uniform.items():
        measure(f"uniform {label}", work / f"uniform-{label}", mix=mix, method=method)
    low, high = sizes.size(uniform["int4-g128"]), sizes.size(uniform["int8-g128"])
    comparisons = []
    for f in fractions:
        budget = int(low + f * (high - low))
        measure(f"budget {f:g}", work / f"budget-{f:g}", {"budget_bytes": budget}, size_budget=budget, method=method)
        naive_mix = sizes.naive(budget)
        measure(f"naive {f:g}", work / f"naive-{f:g}", {"budget_bytes": budget, "counts": _counts(naive_mix)}, mix=naive_mix,
                method=method)
        assert rows[f"naive {f:g}"]["decoder_bytes"] <= budget and rows[f"budget {f:g}"]["decoder_bytes"] <= budget
        comparisons.append({"fraction": f, "budget_bytes": budget, "budget_kld": rows[f"budget {f:g}"]["kld_mean"],
                            "naive_kld": rows[f"naive {f:g}"]["kld_mean"],
                            "budget_wins": rows[f"budget {f:g}"]["kld_mean"] < rows[f"naive {f:g}"]["kld_mean"]})
    return {"checkpoint": str(checkpoint), "method": method, "choosable_tensors": len(sizes.items),
            "choosable_weights": sizes.bplan.weights, "fixed_bytes": sizes.fixed, "eval_positions": len(windows) * (WINDOW - 0),
            "rows": rows, "comparisons": comparisons}


def _counts(mix: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in mix.values():
        out[label] = out.get(label, 0) + 1
    return dict(sorted(out.items()))


# ---- cost of the sensitivity pass at full width -------------------------------------------------------


def sensitivity_cost(checkpoint: Path) -> dict:
    import resource

    import torch

    from phi3_export.quant.awq_search import AwqOptions
    from phi3_export.quant.budget_sensitivity import measure_errors

    torch.set_num_threads(2)
    ckpt = Checkpoint(checkpoint)
    arch = checked_architecture(ckpt)
    plan = arch.plan(ckpt.config)
    items = choosable_tensors(plan, QuantSettings(4, "rtn", 128, True, 4))

    class Timer:
        def __init__(self):
            self.wall, self.cpu, self.steps = time.time(), time.process_time(), []

        def advance(self, what: str = "") -> None:
            wall, cpu = time.time(), time.process_time()
            self.steps.append({"step": what, "wall_s": round(wall - self.wall, 1), "cpu_s": round(cpu - self.cpu, 1)})
            self.wall, self.cpu = wall, cpu

    timer = Timer()
    measure_errors(ckpt, arch, plan, corpus_text("calibration"), AwqOptions(), items, None, timer)
    layers = [s for s in timer.steps if s["step"].startswith("layer")][1:] or timer.steps[:1]  # layer 0 also reads the embedding rows
    return {"checkpoint": str(checkpoint), "hidden": ckpt.config["hidden_size"], "intermediate": ckpt.config["intermediate_size"],
            "steps": timer.steps, "per_layer_wall_s": max(s["wall_s"] for s in layers),
            "per_layer_cpu_s": max(s["cpu_s"] for s in layers), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load_average": list(__import__("os").getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", type=Path, help="default: the trained tiny fixture and SmolLM2")
    parser.add_argument("--budgets", default="0.15,0.35,0.6", help="budgets as fractions of [all int4-g128, all int8-g128]")
    parser.add_argument("--windows", type=int, default=16, help="eval windows of 256 tokens (at most)")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--cost", type=Path, help="a full-width checkpoint to time the sensitivity pass on")
    parser.add_argument("--out", type=Path, default=OUT / "bench_budget.json")
    parser.add_argument("--reuse", action="store_true", help="keep fp32, uniform and naive artifacts and figures of an earlier run")
    args = parser.parse_args()
    checkpoints = args.checkpoint or [tiny_fixture(), SMOLLM2]
    fractions = [float(f) for f in args.budgets.split(",")]
    doc = {"window": WINDOW, "eval_text": "corpus eval part", "threads": 2,
           "checkpoints": [bench_checkpoint(c, fractions, args.windows, args.method, args.reuse) for c in checkpoints]}
    if args.cost:
        doc["sensitivity_cost"] = sensitivity_cost(args.cost)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for c in doc["checkpoints"]:
        for row in c["comparisons"]:
            print(f"{Path(c['checkpoint']).name} budget {row['budget_bytes'] / 1e6:.3f} MB: measured choice KLD "
                  f"{row['budget_kld']:.5f} vs naive {row['naive_kld']:.5f} -> {'wins' if row['budget_wins'] else 'LOSES'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
