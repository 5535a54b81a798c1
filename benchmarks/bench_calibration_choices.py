"""AWQ's cheaper searches against the exhaustive ones they replaced, on real layers: the alphas
and clip ratios each picks from the same weights and inputs, and what each choice scores under
the reference scorer (every captured token; all windows for a module-scored group), with plain
RTN's score beside them.

Usage: python benchmarks/bench_calibration_choices.py [--options JSON] [--choice-layers 0,8,15,22,29]
  --options: AwqOptions fields of the search compared with the old one ({"label": {fields}, ...}
  for several). Real weights: the SmolLM2-135M fixture. Results merge into
  build/bench/bench_calibration.json under "choices" / --label.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from calibration_common import OLD_SEARCH, OUT, SMOLLM2, awq_options, merge_result


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
    from phi3_export.fixtures.smollm2 import smollm2_checkpoint
    from phi3_export.quant.calibrate import calibration_tokens, capture_inputs
    from phi3_export.quant.settings import QuantSettings

    ckpt = Checkpoint(smollm2_checkpoint(SMOLLM2.parent))
    arch = architecture(ckpt.config["architectures"][0])
    plan = arch.plan(ckpt.config)
    settings = QuantSettings(bits=4, method="awq", block_size=128, symmetric=False, accuracy_level=1)
    variants = json.loads(args.options)
    variants = variants if variants and all(isinstance(v, dict) for v in variants.values()) else {"new": variants}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--label", default="current", help="key the results are stored under")
    ap.add_argument("--options", default="{}", help="AwqOptions fields as JSON, or {label: fields, ...} for several")
    ap.add_argument("--choice-layers", default="0,8,15,22,29", help="layers of the checkpoint to compare on")
    args = ap.parse_args()
    merge_result(args.out, "choices", args.label, choices(args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
