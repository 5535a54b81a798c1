"""AWQ's searches and its exact scale folding (the layer loop is quant/awq.py).

``search_scale`` grid-searches the per-channel scale of one scaling group; ``search_clip``
the per (row, block) clip ratio of one linear. Every linear is fake-quantized at its own
``Storage`` (a size budget may mix block sizes and bit widths within a layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from phi3_export.arch.plan import DecoderLayer, Norm, ScalingGroup
from phi3_export.quant.rtn import quantize_rtn
from phi3_export.quant.settings import Storage


@dataclass(frozen=True)
class AwqOptions:
    samples: int = 32
    seqlen: int = 256
    seed: int = 0
    alpha_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    score_tokens: int = 4096  # tokens used to score a scale candidate
    clip_tokens: int = 256  # tokens used to score a clip ratio
    min_tokens: int = 32  # fewer calibration tokens reaching a linear (a rarely routed expert): plain RTN


# ---- scale folding: exact in floating point, tested on its own ------------------------------

def expand_scale(group: ScalingGroup, s: torch.Tensor) -> torch.Tensor:
    """Scale per input column of the group's linears, from the searched per-channel scale."""
    kv = group.kv_shared
    if kv is None:
        return s
    # One scale per KV-head channel; query head h reads KV head h // n_rep (transformers' repeat_kv).
    return s.view(kv.kv_heads, 1, kv.head_dim).expand(-1, kv.n_rep, -1).reshape(-1)


def fold_scale(weights: dict[str, torch.Tensor], group: ScalingGroup, s: torch.Tensor) -> None:
    """W[:, c] *= s[c] for the group's linears and 1/s into ``prev``, in place; output unchanged."""
    full = expand_scale(group, s)
    for linear in (*group.linears, *group.also_scaled):
        weights[linear.weight].mul_(full[None, :])
    prev = group.prev
    if isinstance(prev, Norm):
        for name in prev.tensors():  # LayerNorm: its bias too, since y = norm(x) * w + b
            weights[name].div_(full)
        return
    rows = prev.rows(group.prev_part).index() if group.prev_part else slice(None)
    weights[prev.weight][rows] = weights[prev.weight][rows] / s[:, None]  # assignment: a row list indexes a copy
    if prev.bias:
        weights[prev.bias][rows] = weights[prev.bias][rows] / s


def channel_stat(group: ScalingGroup, x: torch.Tensor) -> torch.Tensor:
    """mean |x| per scalable channel (per KV-head channel for a kv_shared group)."""
    return _per_scalable_channel(group, x.abs().mean(dim=0))


def weight_stat(group: ScalingGroup, w: torch.Tensor, block: int) -> torch.Tensor:
    """mean over rows of |w| normalised by its block's max: how large each input channel's weights are."""
    rows, cols = w.shape
    blocks = w.abs().view(rows, -1, block) if cols % block == 0 else w.abs()[:, None, :]
    normalised = (blocks / blocks.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(rows, cols)
    return _per_scalable_channel(group, normalised.mean(dim=0))


def _per_scalable_channel(group: ScalingGroup, stat: torch.Tensor) -> torch.Tensor:
    kv = group.kv_shared
    if kv is not None:
        stat = stat.view(kv.kv_heads, kv.n_rep, kv.head_dim).mean(dim=1).reshape(-1)
    return stat


# ---- searches ----------------------------------------------------------------------------------

def fake_quant(w: torch.Tensor, storage: Storage) -> torch.Tensor:
    return quantize_rtn(w, storage.bits, storage.block_size, storage.symmetric).dequantize()


def _output_error(x: torch.Tensor, w_ref: torch.Tensor, w_new: torch.Tensor, chunk: int = 1024) -> float:
    err = 0.0
    diff = (w_new - w_ref).T
    for start in range(0, x.shape[0], chunk):
        err += (x[start : start + chunk] @ diff).pow(2).sum().item()
    return err / (x.shape[0] * w_ref.shape[0])


def search_scale(group: ScalingGroup, x: torch.Tensor, weights: list[torch.Tensor], storages: list[Storage],
                 grid: int, score=None) -> tuple[torch.Tensor, float]:
    """Best s over the alpha grid; ``score(candidate_weights)`` defaults to the linears' output error.

    ``storages[i]`` is how ``weights[i]`` will be stored."""
    w = torch.cat(weights, dim=0)
    if score is None:
        def score(candidate: list[torch.Tensor]) -> float:
            return _output_error(x, w, torch.cat(candidate, dim=0))
    stat = channel_stat(group, x)
    # Activation and weight magnitudes both (AutoAWQ's "duo scaling"): s = x^a / w^(1-a).
    w_stat = weight_stat(group, w, min(st.block_size for st in storages))
    # Start from no scaling at all, so the search never does worse than plain RTN on its score.
    best_s, best_alpha = torch.ones_like(stat), None
    best_err = score([fake_quant(wi, st) for wi, st in zip(weights, storages)])
    for k in range(grid):
        alpha = k / grid
        s = (stat.pow(alpha) / w_stat.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        full = expand_scale(group, s)
        err = score([fake_quant(wi * full[None, :], st) / full[None, :] for wi, st in zip(weights, storages)])
        if err < best_err:
            best_s, best_err, best_alpha = s, err, alpha
    return best_s, best_alpha


def module_scorer(module: torch.nn.Module, layer: DecoderLayer, group: ScalingGroup, x: torch.Tensor, extra: dict):
    """Scores candidate weights of ``group`` by the output of its ``inspect`` submodule on ``x``."""
    inspected = module.get_submodule(group.inspect)
    linears = [module.get_submodule(layer.module_path(lin.weight)) for lin in group.linears]
    # The attention submodule needs the RoPE tables and the mask; an MLP or MoE block only x.
    wants = ("position_embeddings", "attention_mask") if group.inspect == layer.attention.module else ()
    kwargs = {k: v for k, v in extra.items() if k in wants}

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = inspected(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    reference = run()

    def score(candidate: list[torch.Tensor]) -> float:
        originals = [lin.weight.data for lin in linears]
        for lin, w in zip(linears, candidate):
            lin.weight.data = w
        try:
            return (run() - reference).pow(2).mean().item()
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w

    return score


def search_clip(x: torch.Tensor, w: torch.Tensor, storage: Storage, options: AwqOptions,
                row_chunk: int = 256) -> torch.Tensor:
    """Per (row, block) shrink of the quantization range minimising that block's output error."""
    rows, cols = w.shape
    block = storage.block_size
    if cols % block:
        return w
    nb = cols // block
    xb = x.view(x.shape[0], nb, block)
    out = torch.empty_like(w)
    ratios = [1 - options.max_shrink * k / options.clip_grid for k in range(options.clip_grid)]
    for r0 in range(0, rows, row_chunk):
        wb = w[r0 : r0 + row_chunk].view(-1, nb, block)
        ref = torch.einsum("tgb,ogb->tog", xb, wb)
        if storage.symmetric:
            hi = wb.abs().amax(dim=-1, keepdim=True)
            lo = -hi
        else:
            hi, lo = wb.amax(dim=-1, keepdim=True), wb.amin(dim=-1, keepdim=True)
        best_err = torch.full(wb.shape[:2], math.inf)
        best = wb.clone()
        for ratio in ratios:
            clipped = torch.maximum(torch.minimum(wb, hi * ratio), lo * ratio)
            q = fake_quant(clipped.reshape(-1, cols), storage).view_as(wb)
            err = (torch.einsum("tgb,ogb->tog", xb, q) - ref).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], clipped, best)
        out[r0 : r0 + row_chunk] = best.view(-1, cols)
    return out
