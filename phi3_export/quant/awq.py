"""Activation-aware weight quantization (AWQ, arXiv 2306.00978), on the CPU, one layer at a time.

Per decoder layer: run it once on the calibration activations, capturing each linear's
input; for every scaling group the architecture declares, grid-search alpha in [0, 1) for
s = mean|x|**alpha (normalised), scoring the group's output error after quantize-dequantize;
fold 1/s into the preceding norm (or rows of the preceding linear) and s into the group's
columns; then search a clip ratio per output row and block. The layer is then quantized by
the same RTN and written to the quantized checkpoint, so exporters see no difference.

The algorithm never names a model: groups, fused row layouts and the layer module all come
from the architecture module. Under GQA the V->o_proj scale is one value per KV-head
channel, repeated to the query heads that share it, so folding stays exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from phi3_export.arch.plan import DecoderLayer
from phi3_export.job import Job
from phi3_export.quant.awq_search import AwqOptions, expand_scale, fold_scale, module_scorer, search_clip, search_scale
from phi3_export.quant.calibrate import LayerWork, calibrated_quantize, subsample
from phi3_export.quant.request import QuantizeRequest
from phi3_export.quant.settings import QuantSettings
from phi3_export.quant.store import linear_storage

__all__ = ["AwqOptions", "awq_layer", "awq_quantize_checkpoint", "expand_scale", "fold_scale"]


@dataclass
class LayerResult:
    alphas: dict[str, float | None]
    rtn_fallback: list[str]  # linears left to plain RTN: too few calibration tokens reached them
    input_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # per linear: the scale folded into its columns


def awq_layer(weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], layer: DecoderLayer,
              settings: QuantSettings, options: AwqOptions, seed: int, module: torch.nn.Module | None = None,
              extra: dict | None = None, tick=None) -> LayerResult:
    """Scale and clip one layer's weights in place.

    ``inputs`` holds each linear's captured input as [tokens, channels] (tokens of the
    calibration windows in order, so windows of ``options.seqlen`` for every linear the whole
    sequence reaches); ``module`` (the float layer) lets groups with ``inspect`` be scored by a
    submodule's output. A group whose input fewer than ``options.min_tokens`` calibration tokens
    reached (a MoE expert the router rarely picks) is not searched, nor are such linears clipped:
    they keep plain RTN rounding (after any shared scale folded into their input, which is exact).
    ``tick(what)`` is called after each group's search and after the clip search (progress).
    """
    tick = tick or (lambda _what: None)
    input_scale: dict[str, torch.Tensor] = {}
    result = LayerResult({}, [])
    starved = {name for name, x in inputs.items() if x.shape[0] < options.min_tokens}
    for group in layer.scaling_groups:
        source = (group.also_scaled or group.linears)[0].weight  # a linear reading exactly the group's input
        if source in starved:
            tick(f"{group.label} (too few tokens)")
            continue
        storages = [linear_storage(lin, settings) for lin in group.linears]
        if not any(st.quantized for st in storages):  # every linear kept float (a recipe override): no error to protect from
            tick(f"{group.label} (kept float)")
            continue
        x = subsample(inputs[source], options.score_tokens, seed)
        score = None
        if group.inspect and module is not None:
            windows = inputs[source].view(-1, options.seqlen, inputs[source].shape[-1])
            samples = max(1, options.score_tokens // options.seqlen)
            score = module_scorer(module, layer, group, windows[:samples], extra or {})
        s, alpha = search_scale(group, x, [weights[lin.weight] for lin in group.linears], storages, options.alpha_grid, score)
        fold_scale(weights, group, s)
        for lin in group.linears:
            input_scale[lin.weight] = expand_scale(group, s)
        result.alphas[group.label] = alpha
        tick(group.label)
    result.rtn_fallback = sorted(starved)
    result.input_scale = input_scale
    if options.clip:
        for lin in layer.linears():
            if not linear_storage(lin, settings).quantized or lin.weight in starved:
                continue
            x = subsample(inputs[lin.weight], options.clip_tokens, seed + 1)
            if lin.weight in input_scale:
                x = x / input_scale[lin.weight][None, :]
            for rows in lin.clipped_rows():
                weights[lin.weight][rows] = search_clip(x, weights[lin.weight][rows], linear_storage(lin, settings), options)
    tick("clip search")
    return result


def layer_steps(layer: DecoderLayer) -> int:
    """Ticks ``awq_layer`` makes: each scaling group, then the clip search."""
    return len(layer.scaling_groups) + 1


def awq_quantize_checkpoint(job: Job, out: Path, request: QuantizeRequest) -> Path:
    """AWQ into ``out`` (quant/calibrate.py's layer loop); with ``request.resume``, finished layers
    there are kept and reused."""
    options: AwqOptions = request.awq or AwqOptions()
    settings = job.settings

    def process(weights, inputs, layer, module, extra, tick) -> LayerWork:
        # ``awq_layer`` looked up at call time: the resume test interrupts it.
        done = awq_layer(weights, inputs, layer, settings, options, seed=options.seed + layer.index, module=module,
                         extra=extra, tick=tick)
        return LayerWork(rtn_fallback=done.rtn_fallback)

    return calibrated_quantize(job, out, replace(request, awq=options), "awq", process, layer_steps,
                               {"awq": asdict(options)}, [options])
