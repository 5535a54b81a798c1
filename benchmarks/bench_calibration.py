"""Calibration (AWQ) cost and accuracy: where a full-width layer's time goes, and what it buys.

Modes (results merge into build/bench/bench_calibration.json under ``--label``, so a run
before a change and one after sit side by side):

  (default) layer split  AWQ on ``--layers`` full-width Phi-3-mini layers (random bf16
                         checkpoint from fixtures/full_size.py, 32 heads / 32 KV heads,
                         hidden 3072, intermediate 8192, vocab 32064), timed as capture
                         forward / each scaling group's search / each linear's clip search /
                         store, in a child process whose peak anonymous RSS is sampled
                         (memory.run_measured). Weights are random, so only time and memory
                         mean anything here, not the chosen alphas.
  --accuracy             fp32, RTN and AWQ exports (w4 g128 asym, accuracy level 1, cpu) of
                         real-weight checkpoints (SmolLM2-135M in Phi-3 layout, a trained tiny
                         fixture), then mean per-token KL(fp32 || quantized) and perplexity
                         on the corpus' eval part in windows of 512, through onnxruntime
                         on every core.
  --choices              the alphas and clip ratios the searches pick on one real layer,
                         for two AwqOptions (``--choices-a`` / ``--choices-b``, JSON), and
                         each choice's score under the exhaustive reference scorer.
  --full-depth           `phi3-export quantize --method M` for each M of ``--methods`` on a
                         32-layer full Phi-3-mini-shape random checkpoint, under run_measured:
                         wall time and peak anonymous RSS (hours: not run by CI).

onnxruntime defaults to one intra-op thread on this VM: every timing here passes the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from phi3_export.machine import machine
from phi3_export.memory import run_measured

CORES = machine()["cores"]
RECIPE = "phi-3-mini-4k"
QFLAGS = ("--bits", "4", "--block-size", "128", "--asymmetric", "--accuracy-level", "1", "--target", "cpu")


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


def _layer_loop():
    """(the AWQ module, capture_inputs, calibration_tokens), wherever the shared layer loop lives now."""
    from phi3_export.quant import awq

    try:
        from phi3_export.quant.calibrate import calibration_tokens, capture_inputs
    except ImportError:  # before the loop moved to quant/calibrate.py
        calibration_tokens, capture_inputs = awq.calibration_tokens, awq._capture_inputs
    return awq, capture_inputs, calibration_tokens


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
    loop, capture_inputs, calibration_tokens = _layer_loop()
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


# ---- accuracy ---------------------------------------------------------------------------------

def export(ckpt: Path, out: Path, *flags: str) -> dict:
    if (out / "onnx-cpu" / "genai_config.json").is_file() and (out.parent / f"{out.name}.run.json").is_file():
        return json.loads((out.parent / f"{out.name}.run.json").read_text())
    cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--quiet", "--force",
           *flags]
    r = run_measured(cmd)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    figures = {"wall_s": round(r.wall_s, 1), "peak_rss_anon_mb": round(r.peak_rss_anon_mb)}
    (out.parent / f"{out.name}.run.json").write_text(json.dumps(figures))
    return figures


def log_softmax(logits):
    import numpy as np

    logits = logits.astype(np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def window_logprobs(folder: Path, ids: list[int], window: int):
    """log-softmax of every next-token distribution over non-overlapping windows of ``window`` tokens."""
    import numpy as np

    from phi3_export.validate.ort_decoder import OrtDecoder

    decoder = OrtDecoder(folder, threads=CORES)
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = np.asarray(ids[start : start + window])[None, :]
        if chunk.shape[1] < 2:
            break
        logits, _ = decoder.step(chunk, decoder.empty_cache())
        out.append(log_softmax(logits[0]))
    return out


def kl_and_ppl(reference: list, quantized: list, ids: list[int], window: int) -> dict:
    """Mean per-token KL(ref || quantized) and the quantized model's perplexity, over the same windows."""
    import numpy as np

    kls, nll, count = [], 0.0, 0
    for w, (p, q) in enumerate(zip(reference, quantized)):
        kls.append((np.exp(p) * (p - q)).sum(axis=-1))
        targets = np.asarray(ids[w * window + 1 : w * window + 1 + p.shape[0]])
        nll -= q[np.arange(len(targets)), targets].sum()
        count += len(targets)
    kl = np.concatenate(kls)
    return {"mean_kl": round(float(kl.mean()), 6), "p99_kl": round(float(np.quantile(kl, 0.99)), 5),
            "perplexity": round(float(np.exp(nll / count)), 4), "tokens": int(kl.size)}


def accuracy_checkpoints(work: Path, names: list[str]) -> dict[str, Path]:
    found = {}
    if "smollm2" in names:
        found["smollm2"] = REPO / "build" / "fixtures" / "smollm2-135m-phi3"
    if "tiny" in names:
        tiny = work / "tiny-trained"
        if not (tiny / "config.json").is_file():
            r = run_measured([sys.executable, "-m", "phi3_export", "fixture", "--recipe", RECIPE, "--train-steps", "200",
                              "--layers", "4", "--hidden", "256", "--out", str(tiny), "--force", "--quiet"])
            if r.returncode:
                raise RuntimeError(r.stderr[-2000:])
        found["tiny"] = tiny
    return found


def accuracy(args) -> dict:
    from transformers import AutoTokenizer

    from phi3_export.fixtures.corpus import corpus_text

    result = {}
    for name, ckpt in accuracy_checkpoints(args.work, args.checkpoints.split(",")).items():
        work = args.work / f"accuracy-{name}"
        ids = AutoTokenizer.from_pretrained(ckpt)(corpus_text("eval")).input_ids
        fp32 = export(ckpt, work / "fp32", "--bits", "32", "--target", "cpu")
        reference = window_logprobs(work / "fp32" / "onnx-cpu", ids, args.window)
        rows = {"fp32": fp32}
        for method in args.methods.split(","):
            out = work / f"{method}-{args.label}" if method == "awq" else work / method
            figures = export(ckpt, out, *QFLAGS, "--method", method)
            rows[method] = {**figures, **kl_and_ppl(reference, window_logprobs(out / "onnx-cpu", ids, args.window), ids,
                                                    args.window)}
            print(name, method, rows[method], flush=True)
        result[name] = {"checkpoint": str(ckpt.relative_to(REPO)) if ckpt.is_relative_to(REPO) else str(ckpt),
                        "eval_tokens": len(ids), "window": args.window, "runs": rows}
    return {"settings": " ".join(QFLAGS), "ort_threads": CORES, **result}


# ---- choices: the old search against the current one on real layers ---------------------------

# The exhaustive searches this change replaced (with search_scale(keep=0): every alpha on every token).
OLD_SEARCH = {"score_tokens": 4096, "clip_tokens": 256, "clip_refine": False}


def _clip_ratios(w: torch.Tensor, clipped: torch.Tensor, block: int) -> torch.Tensor:
    """Per (row, block): the clipped range over the original one (1 = no clipping)."""
    def span(t: torch.Tensor) -> torch.Tensor:
        b = t.view(t.shape[0], -1, block)
        return b.amax(-1) - b.amin(-1)

    return span(clipped) / span(w).clamp(min=1e-12)


def search_input(case, source: str, tokens: int) -> torch.Tensor:
    """What the loop hands a scale search: a random subsample of ``tokens`` in token order."""
    from phi3_export.quant.calibrate import subsample

    return subsample(case.inputs[source], tokens, case.seed)


class LayerCase:
    """One captured real layer: what the choices of both searches are compared on."""

    def __init__(self, layer, weights, module, inputs, extra, settings, base):
        self.layer, self.weights, self.module, self.inputs, self.extra = layer, weights, module, inputs, extra
        self.settings, self.base, self.seed, self.input_scale = settings, base, base.seed + layer.index, {}

    def scorer(self, group, tokens: int, old: bool = False):
        """The scorer a search given ``tokens`` uses (None: search_scale's default); ``tokens`` 0:
        every captured token / window; ``old``: every token given scored, as before this change."""
        from phi3_export.quant import awq_search as search

        src = (group.also_scaled or group.linears)[0].weight
        every = {"scored": 1 << 30, "screened": 1 << 30} if old or not tokens else {}
        if not group.inspect:
            if not every:
                return None
            x = search_input(self, src, tokens) if tokens else self.inputs[src]
            return search.linear_scorer(x, torch.cat([self.weights[lin.weight] for lin in group.linears]), **every)
        windows = self.inputs[src].view(-1, self.base.seqlen, self.inputs[src].shape[-1])
        count = max(1, tokens // self.base.seqlen) if tokens else windows.shape[0]
        return search.module_scorer(self.module, self.layer, group, windows[:count], self.extra, **every)

    def group_row(self, group, runs: dict) -> dict:
        from phi3_export.quant import awq_search as search
        from phi3_export.quant.store import linear_storage

        src = (group.also_scaled or group.linears)[0].weight
        ws = [self.weights[lin.weight] for lin in group.linears]
        sts = [linear_storage(lin, self.settings) for lin in group.linears]
        truth, row = self.scorer(group, 0), {"layer": self.layer.index, "group": group.label}
        row["rtn_score"] = truth([search.fake_quant(wi, st) for wi, st in zip(ws, sts)])
        picks = {}
        for label, o in runs.items():
            t0 = time.process_time()
            picks[label] = search.search_scale(group, search_input(self, src, o.score_tokens), ws, sts, o.alpha_grid,
                                               self.scorer(group, o.score_tokens, old=label == "old"),
                                               keep=0 if label == "old" else None)
            full = search.expand_scale(group, picks[label][0])
            row[label] = {"alpha": picks[label][1], "cpu_s": round(time.process_time() - t0, 2),
                          "score": truth([search._scaled_fake_quant(wi, full, st) for wi, st in zip(ws, sts)])}
        search.fold_scale(self.weights, group, picks["old"][0])  # as the old search would go on
        for lin in group.linears:
            self.input_scale[lin.weight] = search.expand_scale(group, picks["old"][0])
        return row

    def clip_rows(self, lin, runs: dict) -> list[dict]:
        from phi3_export.quant import awq_search as search
        from phi3_export.quant.calibrate import subsample
        from phi3_export.quant.store import linear_storage

        storage = linear_storage(lin, self.settings)
        block = storage.block_size
        if lin.shape[1] % block:
            return []  # not clipped: search_clip leaves a linear with a partial block as it is
        scale = self.input_scale.get(lin.weight, torch.ones(lin.shape[1]))
        gram = search.block_gram(self.inputs[lin.weight] / scale[None, :], block)
        rows = []
        for part in lin.clipped_rows():
            w = self.weights[lin.weight][part]
            wb = w.view(w.shape[0], -1, block).transpose(0, 1).contiguous()

            def score(clipped: torch.Tensor, wb: torch.Tensor = wb) -> float:
                d = search.fake_quant(clipped, storage).view(clipped.shape[0], -1, block).transpose(0, 1) - wb
                return float(torch.bmm(d, gram).mul_(d).sum())

            row, ratios = {"layer": self.layer.index, "clip": lin.weight, "unclipped_score": score(w)}, {}
            for label, o in runs.items():
                t0 = time.process_time()
                xc = subsample(self.inputs[lin.weight], o.clip_tokens, self.seed + 1) / scale[None, :]
                clipped = search.search_clip(xc, w, storage, o)
                ratios[label] = _clip_ratios(w, clipped, block)
                row[label] = {"cpu_s": round(time.process_time() - t0, 2), "score": score(clipped),
                              "mean_ratio": round(float(ratios[label].mean()), 4)}
            row["same_ratio_fraction"] = {label: round(float(((ratios["old"] - r).abs() < 1e-3).float().mean()), 4)
                                          for label, r in ratios.items() if label != "old"}
            rows.append(row)
        return rows


def choices(args) -> dict:
    """On ``--choice-layers`` of a real checkpoint: the alphas and clip ratios of the old search
    (``OLD_SEARCH``) and of ``--options``, from the same weights and inputs (the old choice is
    folded before the next group, as a run of the old search would), each scored by the
    reference scorer on every captured token (all windows for an inspected group), with plain
    RTN's score beside them. Clip scores are summed over blocks, from every token's block Gram."""
    from phi3_export.arch import architecture
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.stream import embedded, load_tensors, stream_layers
    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.quant.settings import QuantSettings

    _, capture_inputs, calibration_tokens = _layer_loop()
    ckpt = Checkpoint(next(iter(accuracy_checkpoints(args.work, [args.checkpoints.split(",")[0]]).values())))
    arch = architecture(ckpt.config["architectures"][0])
    plan = arch.plan(ckpt.config)
    settings = QuantSettings(bits=4, method="awq", block_size=128, symmetric=False, accuracy_level=1)
    variants = json.loads(args.options)
    variants = variants if all(isinstance(v, dict) for v in variants.values()) else {"new": variants}
    runs = {"old": awq_options(OLD_SEARCH), **{label: awq_options(v) for label, v in variants.items()}}
    base = runs["old"]
    extra = arch.calibration_inputs(ckpt.config, base.seqlen)
    x = embedded(ckpt, plan.decoder, calibration_tokens(ckpt, corpus_text("calibration"), base))
    wanted = [int(v) for v in args.choice_layers.split(",")]
    rows = []
    for layer in stream_layers(ckpt, plan.decoder.layers[: max(wanted) + 1]):
        weights = load_tensors(ckpt, layer.tensors())
        module = arch.loaded_layer(ckpt.config, layer, weights)
        inputs, y = capture_inputs(module, layer, x, extra)
        if layer.index in wanted:
            case = LayerCase(layer, weights, module, inputs, extra, settings, base)
            for group in layer.scaling_groups:
                rows.append(case.group_row(group, runs))
                print(json.dumps(rows[-1]), flush=True)
            for lin in layer.linears():
                for row in case.clip_rows(lin, runs) if lin.quantize else []:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        x = y
        del inputs, module, weights
    groups = [r for r in rows if "group" in r]
    clips = [r for r in rows if "clip" in r]
    def ratios(rs: list[dict], label: str) -> list[float]:
        return [r[label]["score"] / r["old"]["score"] for r in rs]

    summary = {"groups": len(groups), "clipped_linears": len(clips)}
    for label in variants:
        summary[label] = {
            "same_alpha": sum(r["old"]["alpha"] == r[label]["alpha"] for r in groups),
            "scale_score_over_old_mean": round(sum(ratios(groups, label)) / len(groups), 5),
            "scale_score_over_old_max": round(max(ratios(groups, label)), 5),
            "clip_score_over_old_mean": round(sum(ratios(clips, label)) / len(clips), 5),
            "clip_score_over_old_max": round(max(ratios(clips, label)), 5),
            "scale_cpu_s": round(sum(r[label]["cpu_s"] for r in groups), 1),
            "clip_cpu_s": round(sum(r[label]["cpu_s"] for r in clips), 1)}
    summary["old"] = {"scale_cpu_s": round(sum(r["old"]["cpu_s"] for r in groups), 1),
                      "clip_cpu_s": round(sum(r["old"]["cpu_s"] for r in clips), 1)}
    print(json.dumps(summary), flush=True)
    return {"checkpoint": str(ckpt.folder), "layers": wanted, "old": OLD_SEARCH, "variants": variants,
            "truth": "reference scorer on every captured token / window", "summary": summary, "rows": rows}


def full_depth(args) -> dict:
    """Each method on all 32 layers at full size: wall time and peak anonymous RSS (hours)."""
    ckpt = full_size_checkpoint(args.work, 32)
    rows = {}
    for method in args.methods.split(","):
        out = args.work / f"full-depth-{method}"
        cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--quiet",
               "--force", *QFLAGS, "--method", method]
        r = run_measured(cmd)
        rows[method] = {"returncode": r.returncode, "wall_s": round(r.wall_s, 1), "wall_s_per_layer": round(r.wall_s / 32, 1),
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
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "bench_calibration.json")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "calibration")
    ap.add_argument("--label", default="current", help="key the results are stored under (e.g. before, after)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--accuracy", action="store_true")
    mode.add_argument("--choices", action="store_true")
    mode.add_argument("--full-depth", action="store_true")
    ap.add_argument("--layers", type=int, default=1, help="layer split: full-width decoder layers to run")
    ap.add_argument("--options", default="{}", help="AwqOptions fields as JSON (choices: {label: fields, ...} for several)")
    ap.add_argument("--old-search", action="store_true", help="layer split: the exhaustive searches this change replaced")
    ap.add_argument("--checkpoints", default="smollm2,tiny", help="accuracy: smollm2 and/or tiny (trained)")
    ap.add_argument("--methods", default=None, help="accuracy: rtn,awq; full depth: awq,gptq")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--choice-layers", default="0,8,15,22,29", help="choices: layers of the checkpoint to compare on")
    ap.add_argument("--keep", action="store_true", help="full depth: keep the outputs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.accuracy:
        args.methods = args.methods or "rtn,awq"
        merge_result(args.out, "accuracy", args.label, accuracy(args))
    elif args.full_depth:
        args.methods = args.methods or "awq,gptq"
        merge_result(args.out, "full_depth", args.label, full_depth(args))
    elif args.choices:
        merge_result(args.out, "choices", args.label, choices(args))
    else:
        result = layer_split(args)
        merge_result(args.out, "layer_split", args.label, result)
        print(json.dumps({k: v for k, v in result.items() if k != "layers"}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
