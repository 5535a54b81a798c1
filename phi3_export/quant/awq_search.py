"""AWQ's searches and its exact scale folding (the layer loop is quant/awq.py).

``search_scale`` searches the per-channel scale of one scaling group over an alpha grid;
``search_clip`` the per (row, block) clip ratio of one linear. Every linear is
fake-quantized at its own ``Storage`` (a size budget may mix block sizes and bit widths
within a layer).

Cost. At Phi-3-mini widths the exhaustive searches took ~750 CPU-seconds a layer (2 cores):
each of 21 scale candidates scored on 4096 tokens through the attention or MLP module or the
linears (~60% of it), and each of 20 clip ratios scored on 256 tokens for every weight
(~35%). What replaces them (benchmarks/bench_calibration.py measures time and choices):

- Scale: the score's cost is tokens x candidates, so both are cut where the ranking holds.
  Candidates are scored on 1024 tokens (4 windows) and screened on 256: every alpha is
  screened, the 4 best are scored (``search_scale``), 20·256 + 5·1024 token-passes instead of
  21·4096 (8.4x fewer). The channel statistics still use every token handed over (4096):
  on 1024 they cost error. Measured on SmolLM2 (24 groups, scored on all 8192 tokens): 1024
  tokens pick alphas as close to the best as 4096 do, and the screen always kept the
  1024-token winner.
- Clip, a closed form per block: the output error of block g of a row is ``dᵀ H_g d`` with
  d the block's quantize-dequantize error and ``H_g = X_gᵀX_g / n`` (block x block, once per
  linear), so a ratio costs rows·cols·block instead of tokens·rows·cols and H_g can take
  2048 tokens for free (better choices than 256); the ratios go coarse to fine per block (9
  of 20), in row chunks large enough that per-operation overhead does not dominate.
- Fake quantization in place (``_fake_quant_``): quantize_rtn's values in one buffer and five
  passes (2.7x faster than quantize then dequantize); the clip's block extremes come free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    score_tokens: int = 4096  # tokens handed to a scale search: its statistics use all, its scores SCORED_TOKENS
    clip_tokens: int = 2048  # tokens of the clip search's block Gram matrices (their count costs a ratio nothing)
    min_tokens: int = 32  # fewer calibration tokens reaching a linear (a rarely routed expert): plain RTN
    clip_refine: bool = True  # clip ratios coarse to fine per block; False: every ratio of the grid


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


# ---- fake quantization ---------------------------------------------------------------------

def fake_quant(w: torch.Tensor, storage: Storage) -> torch.Tensor:
    """quantize_rtn(w).dequantize(): what the stored codes decode to (a float storage: ``w`` at
    that precision; a group may mix quantized and float linears)."""
    if not storage.quantized:
        return w.to(torch.float16 if storage.precision == "fp16" else torch.float32).to(torch.float32)
    if w.shape[-1] % storage.block_size == 0:
        return _fake_quant_(w.to(torch.float32, copy=True), storage)
    return quantize_rtn(w, storage.bits, storage.block_size, storage.symmetric).dequantize()


def _fake_quant_(w: torch.Tensor, storage: Storage, wmin: torch.Tensor | None = None,
                 wmax: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant`` in place on a float32 tensor [..., cols] with cols a multiple of the block.

    quantize_rtn's arithmetic (so the same values) in one buffer and five passes, where
    quantize then dequantize make seven temporaries the size of ``w``: the codes' ``clamp(round(w
    / s) + z, 0, L) - z`` is ``clamp(round(w / s), -z, L - z)`` (integers, exact in float32) and
    needs no uint8 round trip. ``wmin``/``wmax`` [..., blocks, 1]: the blocks' extremes if known."""
    bits, block = storage.bits, storage.block_size
    b = w.view(*w.shape[:-1], w.shape[-1] // block, block)
    levels = 2**bits - 1
    if wmin is None or wmax is None:
        wmin, wmax = torch.aminmax(b, dim=-1, keepdim=True)
    if storage.symmetric:
        half = 2 ** (bits - 1)
        scales = torch.where(wmax.abs() >= wmin.abs(), wmax, wmin) / -half
        zeros = torch.full_like(scales, half)
    else:
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        scales = (wmax - wmin) / levels
        zeros = torch.round(-wmin / torch.where(scales == 0, torch.ones_like(scales), scales)).clamp(0, levels)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    b.div_(safe).round_().clamp_(min=-zeros, max=levels - zeros).mul_(scales)
    return w


def _scaled_fake_quant(w: torch.Tensor, full: torch.Tensor, storage: Storage) -> torch.Tensor:
    """fake_quant(w * s) / s per column, in one buffer."""
    if not storage.quantized or w.shape[1] % storage.block_size:
        return fake_quant(w * full[None, :], storage) / full[None, :]
    return _fake_quant_(w * full[None, :], storage).div_(full[None, :])


# ---- coarse-to-fine search over a grid -------------------------------------------------------

def coarse_step(n: int) -> int:
    """Coarse stride for an n-point grid: a power of two giving about five coarse points (4 for 20)."""
    return 1 << max(0, int(math.log2(max(1, n // 5))))


# ---- scale search ------------------------------------------------------------------------------

# The loop hands a scale search ``score_tokens`` tokens (windows, for a module scorer): the
# channel statistics use all of them; candidates are scored on the first SCORED_TOKENS, in
# two rounds: every alpha screened on the first SCREENED_TOKENS, then the SCREEN_KEEP best
# scored. Measured on SmolLM2 (24 groups; bench_calibration.py): alphas ranked on 1024 tokens
# miss the best alpha on all 8192 by as little as 4096 do, and the 4 best of a 256-token screen
# always held the 1024-token winner; statistics on only 1024 tokens did cost error.
SCORED_TOKENS = 1024
SCREENED_TOKENS = 256
SCREEN_KEEP = 4


def _output_error(x: torch.Tensor, w_ref: torch.Tensor, w_new: torch.Tensor, chunk: int = 1024) -> float:
    """mean over tokens and rows of (x (w_new - w_ref)ᵀ)²."""
    err = 0.0
    diff = (w_new - w_ref).T
    for start in range(0, x.shape[0], chunk):
        err += (x[start : start + chunk] @ diff).pow(2).sum().item()
    return err / (x.shape[0] * w_ref.shape[0])


def _with_screen(make: Callable, x: torch.Tensor, scored: int | None, screened: int | None, unit: int = 1):
    """``make(x[:n])`` on the first ``scored`` tokens, with a ``screen`` attribute on the first
    ``screened`` (x's first dim counts ``unit`` tokens each: windows) when that is fewer.
    None: SCORED_TOKENS / SCREENED_TOKENS, read at call time."""
    scored = SCORED_TOKENS if scored is None else scored
    screened = SCREENED_TOKENS if screened is None else screened

    def rows(tokens: int) -> int:
        return min(x.shape[0], max(1, -(-tokens // unit)))

    score = make(x[: rows(scored)])
    if rows(screened) < rows(scored):
        score.screen = make(x[: rows(screened)])
    return score


def linear_scorer(x: torch.Tensor, w: torch.Tensor, scored: int | None = None, screened: int | None = None):
    """Scores candidate weights (row blocks of ``w``) by the output error: mean over tokens and
    rows of ``||x (w_c - w)ᵀ||²`` on x's first ``scored`` tokens, ``screen`` on its first
    ``screened`` (random subsets: the loop hands a random subsample, kept in token order).

    (The Gram closed form ``tr(dW XᵀX dWᵀ)`` costs rows·c² a candidate against tokens·rows·c
    direct, so it pays only with more tokens than columns: not with the 1024 that rank the
    alphas as well as 4096, at Phi-3-mini's 3072 and 8192 columns.)"""
    def make(rows: torch.Tensor):
        return lambda candidate: _output_error(rows, w, torch.cat(candidate, dim=0))

    return _with_screen(make, x, scored, screened)


def search_scale(group: ScalingGroup, x: torch.Tensor, weights: list[torch.Tensor], storages: list[Storage],
                 grid: int, score=None, *, keep: int | None = None) -> tuple[torch.Tensor, float]:
    """Best s over the alpha grid; ``score(candidate_weights)`` defaults to ``linear_scorer(x, ...)``.

    ``storages[i]`` is how ``weights[i]`` will be stored. A ``score`` with a ``screen``
    attribute is searched in two rounds: every alpha screened, the ``keep`` best scored (None:
    SCREEN_KEEP; 0: every alpha scored). Cost: grid·screened + keep·scored tokens through the
    scorer instead of grid·scored. (Coarse to fine over alpha, 9 of 20, was measured to miss the
    grid's best by up to 5% of the error: the curves have bumps near their minimum.)"""
    w = torch.cat(weights, dim=0)
    if score is None:
        score = linear_scorer(x, w)
    stat = channel_stat(group, x)
    # Activation and weight magnitudes both (AutoAWQ's "duo scaling"): s = x^a / w^(1-a).
    w_stat = weight_stat(group, w, min(st.block_size for st in storages if st.quantized))

    def scale(k: int) -> torch.Tensor:
        alpha = k / grid
        s = (stat.pow(alpha) / w_stat.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    def err(k: int, scorer=score) -> float:
        full = expand_scale(group, scale(k))
        return scorer([_scaled_fake_quant(wi, full, st) for wi, st in zip(weights, storages)])

    # No scaling at all competes too (and wins ties), so the search never does worse than plain RTN on its score.
    rtn = score([fake_quant(wi, st) for wi, st in zip(weights, storages)])
    screen = getattr(score, "screen", None)
    keep = SCREEN_KEEP if keep is None else keep
    kept = range(grid)
    if screen is not None and 0 < keep < grid:
        screened = {j: err(j, screen) for j in range(grid)}
        kept = sorted(screened, key=lambda j: (screened[j], j))[:keep]
    scores = {j: err(j) for j in kept}
    k = min(scores, key=lambda j: (scores[j], j)) if scores else None
    if k is None or scores[k] >= rtn:
        return torch.ones_like(stat), None
    return scale(k), k / grid


def module_scorer(module: torch.nn.Module, layer: DecoderLayer, group: ScalingGroup, x: torch.Tensor, extra: dict,
                  scored: int | None = None, screened: int | None = None):
    """Scores candidate weights of ``group`` by the output of its ``inspect`` submodule on the
    first windows of ``x`` [windows, seq, hidden] that hold ``scored`` tokens (at least one);
    ``screen``: the same on ``screened`` tokens' worth, for ``search_scale``'s first round."""
    inspected = module.get_submodule(group.inspect)
    linears = [module.get_submodule(layer.module_path(lin.weight)) for lin in group.linears]
    # The attention submodule needs the RoPE tables and the mask; an MLP or MoE block only x.
    wants = ("position_embeddings", "attention_mask") if group.inspect == layer.attention.module else ()
    kwargs = {k: v for k, v in extra.items() if k in wants}

    def run(inp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = inspected(inp, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def make(inp: torch.Tensor):
        reference = run(inp)

        def score(candidate: list[torch.Tensor]) -> float:
            originals = [lin.weight.data for lin in linears]
            for lin, w in zip(linears, candidate):
                lin.weight.data = w
            try:
                return (run(inp) - reference).pow(2).mean().item()
            finally:
                for lin, w in zip(linears, originals):
                    lin.weight.data = w

        return score

    return _with_screen(make, x, scored, screened, unit=x.shape[1] if x.ndim == 3 else 1)


# ---- clip search --------------------------------------------------------------------------------

def block_gram(x: torch.Tensor, block: int) -> torch.Tensor:
    """[blocks, block, block]: H_g = X_gᵀ X_g / tokens for each block g of x's columns."""
    tokens, cols = x.shape
    xb = x.reshape(tokens, cols // block, block).transpose(0, 1)  # [blocks, tokens, block]
    return torch.bmm(xb.transpose(1, 2), xb).div_(tokens)


def clip_errors(wb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratio, gram: torch.Tensor, storage: Storage,
                extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[blocks, rows]: dᵀ H_g d per block and row, d the quantization error of ``wb`` [blocks, rows, block]
    clipped to ``ratio`` (a number, or one per block and row) of its range [lo, hi] ([blocks, rows, 1]).
    ``extremes``: each block's (min, max) if known."""
    low, high = lo * ratio, hi * ratio
    clipped = torch.clamp(wb, low, high)
    # clamp is monotone, so the clipped blocks' extremes are the clamped extremes: no pass over them.
    wmin, wmax = extremes if extremes is not None else torch.aminmax(wb, dim=-1, keepdim=True)
    wmin, wmax = torch.clamp(wmin, low, high)[..., None], torch.clamp(wmax, low, high)[..., None]
    d = _fake_quant_(clipped, storage, wmin, wmax).sub_(wb)
    return torch.bmm(d, gram).mul_(d).sum(dim=-1)


def search_clip(x: torch.Tensor, w: torch.Tensor, storage: Storage, options: AwqOptions,
                row_chunk: int = 0) -> torch.Tensor:
    """Per (row, block) shrink of the quantization range minimising that block's output error.

    The error of block g of a row is ``dᵀ H_g d`` (d: its quantize-dequantize error against
    the unclipped weights, H_g: ``block_gram`` of x), so x's token count only enters once,
    in H_g. Ratios ``1 - max_shrink·k/clip_grid``, searched coarse to fine per block (every
    ``coarse_step``-th ratio, then each block's best one's neighbours at half the distance, down
    to 1: 9 of 20), or all of them with ``options.clip_refine`` off.
    Rows go ``row_chunk`` at a time (default: ~4M weights; smaller chunks measured slower, the
    per-operation overhead outweighing the cache)."""
    rows, cols = w.shape
    block = storage.block_size
    if cols % block:
        return w
    nb = cols // block
    gram = block_gram(x.to(torch.float32), block)
    n = options.clip_grid
    ratios = torch.tensor([1 - options.max_shrink * k / n for k in range(n)])
    row_chunk = row_chunk or max(1, (1 << 22) // cols)
    out = torch.empty_like(w)
    for r0 in range(0, rows, row_chunk):
        wb = w[r0 : r0 + row_chunk].to(torch.float32).view(-1, nb, block).transpose(0, 1).contiguous()  # [nb, r, block]
        extremes = torch.aminmax(wb, dim=-1, keepdim=True)
        if storage.symmetric:
            hi = torch.maximum(extremes[0].abs(), extremes[1].abs())
            lo = -hi
        else:
            lo, hi = extremes
        best_k = _clip_search(wb, (lo, hi, extremes), ratios, gram, storage, options.clip_refine)
        clipped = torch.clamp(wb, lo * ratios[best_k][..., None], hi * ratios[best_k][..., None])
        out[r0 : r0 + row_chunk] = clipped.transpose(0, 1).reshape(-1, cols)
    return out


def _clip_search(wb, bounds, ratios: torch.Tensor, gram, storage: Storage, refine: bool) -> torch.Tensor:
    """[blocks, rows] index of the best ratio per block and row (ties: the smaller index, i.e. less
    clipping); ``bounds``: (lo, hi, extremes) as ``clip_errors`` takes them."""
    lo, hi, extremes = bounds
    n = len(ratios)
    shape = wb.shape[:2]
    best_err = torch.full(shape, math.inf)
    best_k = torch.zeros(shape, dtype=torch.long)

    def consider(k: torch.Tensor | int) -> None:
        nonlocal best_err, best_k
        if isinstance(k, int):
            err = clip_errors(wb, lo, hi, float(ratios[k]), gram, storage, extremes)
            k = torch.full(shape, k)
        else:
            valid = (k >= 0) & (k < n)
            kc = k.clamp(0, n - 1)
            err = clip_errors(wb, lo, hi, ratios[kc][..., None], gram, storage, extremes).masked_fill_(~valid, math.inf)
        better = (err < best_err) | ((err == best_err) & (k < best_k))
        best_err = torch.where(better, err, best_err)
        best_k = torch.where(better, k, best_k)

    if not refine:
        for k in range(n):
            consider(k)
        return best_k
    step = coarse_step(n)
    for k in range(0, n, step):
        consider(k)
    while step > 1:
        step //= 2
        center = best_k.clone()
        consider(center - step)
        consider(center + step)
    return best_k
