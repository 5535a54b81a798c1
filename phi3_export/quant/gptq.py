"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) on the CPU, one layer at a time, and AWQ then GPTQ.

Per linear, with X its captured calibration input [tokens, cols] and W [rows, cols]:

1. Hessian ``H = XᵀX / tokens`` (float32, accumulated over token chunks; one per distinct input,
   freed once every linear reading that input is done). Dead columns (``H[c, c] == 0``: no
   calibration token exercised them) get ``H[c, c] = 1``; their weights are not zeroed (the
   reference does), they are rounded like RTN with no error fed to other columns. Dampening adds
   ``damp * mean(diag H)`` to the diagonal (retried at 10x and 100x should Cholesky still fail).
2. Block grid: the codes are plain block-wise int4/int8 on MatMulNBits' grid (blocks of
   ``block_size`` consecutive columns, one scale and zero point per row and block), so every
   exporter reads them unchanged. Each block's scale and zero point are RTN's (quant/rtn.py)
   for a range optionally shrunk by a small search (``mse``: per row and block, the shrink
   ratio minimising ``Σ_c H[c,c]·(w_c − ŵ_c)²``, the diagonal estimate of the block's output error).
   Without act-order a block's parameters are chosen when GPTQ reaches its first column, from
   the weights as updated by the errors of the blocks before; with act-order they are chosen
   once from the original weights ("static groups"), since its columns are visited out of order.
3. Order: with act-order, columns in descending ``diag(H)`` (ties by index), each quantized with
   its own block's scale and zero point; else left to right.
4. With ``U`` the upper Cholesky factor of ``H⁻¹`` (in that order; ``InverseFactor``), column by
   column: ``q = clamp(round(w / s) + z, 0, 2^bits − 1)``, ``e = (w − (q − z)·s) / U[j, j]``, and
   the not yet quantized columns take ``W[:, k] −= e·U[j, k]`` (k > j). Lazily, as in the paper:
   per column only within a sub-batch of 16 columns, then the rest of the lazy batch of
   ``batch`` columns in one matrix product, then, when the batch ends, every later column in one.

Rows are independent given H and the parts of a fused linear (q|k|v, gate|up) read the same
input, so quantizing the fused weight is exactly quantizing each part on its own: no per-part
handling is needed. A linear kept float (a router) is untouched; a MoE expert fewer than
``min_tokens`` calibration tokens reached is left to plain RTN (recorded as a fallback).

AWQ then GPTQ (``awq-gptq``): AWQ's scale search and exact fold (no clip search: GPTQ does
the rounding), then GPTQ on the folded weights with the Hessian of the input the folded
weights see, ``X·diag(1/s)``, i.e. ``H' = diag(1/s)·H·diag(1/s)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from phi3_export.arch.plan import DecoderLayer, Linear
from phi3_export.errors import Phi3ExportError
from phi3_export.job import Job
from phi3_export.quant.awq_search import AwqOptions
from phi3_export.quant.calibrate import LayerWork, Tick, calibrated_quantize
from phi3_export.quant.request import QuantizeRequest
from phi3_export.quant.rtn import QuantizedTensor, quantize_rtn
from phi3_export.quant.settings import QuantSettings, Storage
from phi3_export.quant.store import linear_storage


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True  # columns in descending diag(H), with static block parameters
    mse: bool = True  # search each block's range shrink (else RTN's min/max range)
    mse_grid: int = 10  # shrink ratios tried: 1, 1 - max_shrink/grid, ...
    max_shrink: float = 0.2
    batch: int = 128  # lazy-batch columns


SUB_BATCH = 16
BIG = 1024  # a product of BIG x BIG outputs (or an n >= BIG factorisation) runs on the thread pool


@contextmanager
def torch_threads(n: int):
    """Torch on ``n`` threads inside. GPTQ runs its many small ops (a column's rounding, a sub-batch
    update, a range candidate) on one, where waking the thread pool per op cost 2-40x more CPU time
    than it saved on 2 busy cores, and its large products (Cholesky, inversion, trailing updates)
    on the caller's pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- one linear --------------------------------------------------------------------------------

def hessian(x: torch.Tensor, chunk: int = 2048, width: int = 1024) -> torch.Tensor:
    """``XᵀX / tokens`` in float32 for ``x`` [tokens, cols], accumulated ``chunk`` tokens at a time.

    Symmetric, so only the upper triangle's row strips of ``width`` rows are multiplied (one matrix
    product per strip, 56% of the full product's work at 8192 columns) and mirrored at the end."""
    cols = x.shape[1]
    h = torch.zeros(cols, cols, dtype=torch.float32)
    strips = [(start, min(cols, start + width)) for start in range(0, cols, width)]
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float32)
        for i0, i1 in strips:
            h[i0:i1, i0:].addmm_(part[:, i0:i1].T, part[:, i0:])
    for i0, i1 in strips[:-1]:
        h[i1:, i0:i1] = h[i0:i1, i1:].T
    return h.div_(max(1, x.shape[0]))


def block_params(w: torch.Tensor, storage: Storage, weight: torch.Tensor | None = None,
                 options: GptqOptions = GptqOptions(), row_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [rows, blocks] of ``w`` [rows, cols] on its storage's block grid.

    RTN's (quant/rtn.py) for each block's range. With ``options.mse`` the range is shrunk, per row
    and block, by the ratio ``r`` in ``1, 1 - max_shrink/grid, ...`` minimising ``Σ_c weight[c]·(w_c − ŵ_c)²``
    (``weight``: diag H of the columns). Shrinking RTN's range by ``r`` scales its scale by ``r`` and
    keeps its zero point (symmetric: ``2^(bits-1)``; asymmetric: ``round(-min/(max-min)·levels)``),
    so each candidate costs one quantize-dequantize of the block, done ``row_chunk`` rows at a time."""
    base = quantize_rtn(w, storage.bits, storage.block_size, storage.symmetric)
    scales, zeros = base.scales, base.zeros.to(torch.float32)
    if not options.mse or options.mse_grid < 2:
        return scales, zeros
    rows, cols = w.shape
    bs, maxq = storage.block_size, 2**storage.bits - 1
    pad = -cols % bs
    wb = torch.nn.functional.pad(w.to(torch.float32), (0, pad)).view(rows, -1, bs)
    d = torch.nn.functional.pad(weight if weight is not None else torch.ones(cols), (0, pad)).view(1, -1, bs)
    ratios = [1 - options.max_shrink * k / options.mse_grid for k in range(options.mse_grid)]
    if storage.symmetric:  # levels -2^(bits-1) .. 2^(bits-1)-1: the sign says which side gets the extra one
        ratios += [-r for r in ratios]
    best_ratio = torch.ones_like(scales)
    with torch_threads(1):
        for r0 in range(0, rows, row_chunk):
            block, s0, z = wb[r0 : r0 + row_chunk], scales[r0 : r0 + row_chunk, :, None], zeros[r0 : r0 + row_chunk, :, None]
            inv0 = 1 / torch.where(s0 == 0, torch.ones_like(s0), s0)  # RTN's: a zero scale divides by 1
            best = None
            for ratio in ratios:
                q = (block * (inv0 / ratio)).round_().add_(z).clamp_(0, maxq)
                err = q.sub_(z).mul_(s0 * ratio).sub_(block).square_().mul_(d).sum(dim=-1)
                if best is None:
                    best = err
                    continue
                better = err < best
                best = torch.where(better, err, best)
                best_ratio[r0 : r0 + row_chunk][better] = ratio
    return scales * best_ratio, zeros


def invert_lower(m: torch.Tensor, leaf: int = 256, threads: int = 1) -> torch.Tensor:
    """``m⁻¹`` for a lower-triangular ``m`` (zeros above the diagonal), computed in place.

    Blocked: for ``m = [[A, 0], [C, D]]``, ``m⁻¹ = [[A⁻¹, 0], [−D⁻¹·C·A⁻¹, D⁻¹]]``, recursively, with
    triangular solves at blocks of ``leaf`` or fewer: 2n³/3 flops, nearly all of them in two matrix
    products per level (20-35% less CPU time here at n = 3072 and 8192 than solving for the rows of
    ``m⁻¹`` a lazy batch at a time with torch's triangular solve, at half the flops). Levels of
    ``BIG`` rows or more multiply on ``threads`` threads, smaller ones on one."""
    n = m.shape[0]
    if n <= leaf:
        with torch_threads(1):  # small: the pool costs more than it saves
            m.copy_(torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype), upper=False))
        return m
    half = (n // 2 + 63) // 64 * 64  # blocks on 64-column boundaries
    a, c, d = m[:half, :half], m[half:, :half], m[half:, half:]
    invert_lower(a, leaf, threads)
    invert_lower(d, leaf, threads)
    with torch_threads(threads if n >= BIG else 1):
        c.copy_(torch.mm(d, torch.mm(c, a)).neg_())
    return m


class InverseFactor:
    """Rows of ``U``, the upper Cholesky factor of ``(h + λI)⁻¹`` (``UᵀU = (h + λI)⁻¹``), with
    ``λ = damp·mean(diag h)`` (10x, then 100x, should the factorisation fail).

    With ``J`` the order-reversing permutation and ``J(h + λI)J = LLᵀ``: ``(h + λI)⁻¹ =
    (J L⁻ᵀ J)(J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular, so ``U = J L⁻¹ J``: rows ``i1:i2``
    of ``U`` (from column ``i1`` on) are rows ``n-i2:n-i1`` of ``L⁻¹`` (up to column ``n-i1``),
    reversed. ``L⁻¹`` replaces ``L`` in place: one n x n matrix is held, as for ``h`` itself
    (torch's cholesky_inverse, the reference's route, took 3x the CPU time of all of this at n = 3072)."""

    def __init__(self, reversed_h: torch.Tensor, damp: float, threads: int = 1):
        """``reversed_h`` is ``J h J`` (the columns in reverse order), damped here in place; the
        factorisation and inversion run on ``threads`` threads."""
        lam = damp * reversed_h.diagonal().mean().item()
        added = 0.0
        for attempt in range(3):
            reversed_h.diagonal().add_(lam * 10**attempt - added)
            added = lam * 10**attempt
            with torch_threads(threads if reversed_h.shape[0] >= BIG else 1):
                factor, info = torch.linalg.cholesky_ex(reversed_h)
            if info.item() == 0:
                break
        else:
            raise Phi3ExportError("GPTQ: the calibration Hessian is not positive definite even with 100x dampening")
        del reversed_h
        self.inverse, self.n = invert_lower(factor, threads=threads), factor.shape[0]

    def rows(self, i1: int, i2: int) -> torch.Tensor:
        """``U[i1:i2, i1:]``."""
        return self.inverse[self.n - i2 : self.n - i1, : self.n - i1].flip(0, 1)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, storage: Storage, options: GptqOptions = GptqOptions()) -> QuantizedTensor:
    """GPTQ codes of ``w`` [rows, cols] at ``storage`` for inputs with Hessian ``h`` [cols, cols].

    Neither ``w`` nor ``h`` is modified; each is let go as soon as its working copy is made (a
    caller that holds no other reference, e.g. passing ``weights.pop(name)``, frees it then)."""
    pool = torch.get_num_threads()
    with torch_threads(1):
        return _gptq(w, h, storage, options, pool)


def _gptq(w: torch.Tensor, h: torch.Tensor, storage: Storage, options: GptqOptions, pool: int) -> QuantizedTensor:
    rows, cols = w.shape
    bs, maxq = storage.block_size, 2**storage.bits - 1
    weight = h.diagonal().clone()
    weight[weight == 0] = 1.0  # dead inputs: plain rounding, no error fed elsewhere
    static = options.act_order
    nb = -(-cols // bs)
    if static:
        scales, zeros = block_params(w.to(torch.float32), storage, weight, options)
        perm = torch.argsort(weight, descending=True, stable=True)
    else:
        perm = torch.arange(cols)
        scales, zeros = torch.zeros(rows, nb), torch.zeros(rows, nb)
    # Columns as contiguous rows: wt[j] is column perm[j] of w.
    wt = w.T.index_select(0, perm).to(torch.float32).contiguous()
    del w
    reverse = perm.flip(0)
    reordered = h[reverse[:, None], reverse[None, :]]  # J Pᵀ h P J, one copy; h itself is left as it is
    del h
    reordered.diagonal().copy_(weight[reverse])
    inverse = InverseFactor(reordered, options.damp, pool)
    del reordered
    # Per block, transposed too: scale, RTN's safe divisor (1 where the scale is 0), zero point.
    st, zt = scales.T.contiguous(), zeros.T.contiguous()
    safe = torch.where(st == 0, torch.ones_like(st), st)
    order = perm.tolist()
    codes = torch.empty(cols, rows, dtype=torch.uint8)
    # Without act-order a lazy batch holds whole blocks, so a block's columns are up to date when it starts.
    batch = options.batch if static else -(-max(options.batch, bs) // bs) * bs
    sub = SUB_BATCH if static else math.gcd(SUB_BATCH, bs)  # a block starts on a sub-batch
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty(i2 - i1, rows)
        u_rows = inverse.rows(i1, i2)
        u1 = u_rows[:, : i2 - i1]
        pivots = u1.diagonal().tolist()
        # Updates within a sub-batch of SUB_BATCH columns per column, then the rest of the lazy batch
        # at once (two levels of lazy updates), then every later column (on the thread pool).
        for k1 in range(0, i2 - i1, sub):
            k2 = min(k1 + sub, i2 - i1)
            for i in range(k1, k2):
                j = order[i1 + i]
                b = j // bs
                if not static and j % bs == 0:
                    s, z = block_params(w1[i : i + bs].T, storage, weight[j : j + bs], options)
                    st[b], zt[b] = s[:, 0], z[:, 0]
                    safe[b] = torch.where(st[b] == 0, torch.ones_like(st[b]), st[b])
                col = w1[i]
                q = torch.div(col, safe[b]).round_().add_(zt[b]).clamp_(0, maxq)
                codes[j] = q
                e = torch.sub(col, q.sub_(zt[b]).mul_(st[b]), out=err1[i]).div_(pivots[i])
                w1[i + 1 : k2].addr_(u1[i, i + 1 : k2], e, alpha=-1)
            if k2 < i2 - i1:
                w1[k2:].addmm_(u1[k1:k2, k2:].T, err1[k1:k2], alpha=-1)
        if i2 < cols:
            with torch_threads(pool if (cols - i2) * rows >= BIG * BIG else 1):
                wt[i2:].addmm_(u_rows[:, i2 - i1 :].T, err1, alpha=-1)
    return QuantizedTensor(codes.T.contiguous(), st.T.contiguous(), zt.T.to(torch.uint8).contiguous(), storage.bits, bs,
                           storage.symmetric)


# ---- one layer ------------------------------------------------------------------------------------

def gptq_layer(weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], layer: DecoderLayer,
               settings: QuantSettings, options: GptqOptions, min_tokens: int,
               input_scale: dict[str, torch.Tensor] | None = None, tick: Tick | None = None) -> LayerWork:
    """GPTQ codes for every quantized linear of ``layer``; ``inputs`` are consumed as they are used.

    Linears reading one input (``inputs[a] is inputs[b]``) share one Hessian. ``input_scale``:
    per linear, the scale AWQ folded into its columns (its Hessian is divided by it on both sides).
    A quantized linear's float weight is dropped from ``weights`` once its codes are made."""
    tick = tick or (lambda _what: None)
    work = LayerWork()
    for linears in _shared_inputs(layer, inputs):
        x = inputs[linears[0].weight]
        for lin in linears:
            del inputs[lin.weight]
        quantized = [lin for lin in linears if linear_storage(lin, settings).quantized]
        if quantized and x.shape[0] < min_tokens:
            work.rtn_fallback += [lin.weight for lin in quantized]
        elif quantized:
            held = [hessian(x)]  # the last linear takes it from here: no reference left to keep it alive
            del x
            scale = (input_scale or {}).get(quantized[0].weight)
            if scale is not None:
                held[0].div_(scale[:, None]).div_(scale[None, :])
            for k, lin in enumerate(quantized):
                other = (input_scale or {}).get(lin.weight)
                if (other is None) != (scale is None) or (other is not None and not torch.equal(other, scale)):
                    raise ValueError(f"{lin.weight}: a different AWQ scale than the linears sharing its input")
                last = k == len(quantized) - 1
                work.quantized[lin.weight] = gptq_quantize(weights.pop(lin.weight), held.pop() if last else held[0],
                                                           linear_storage(lin, settings), options)
        for lin in linears:
            tick(_short(lin))
    return work


def _shared_inputs(layer: DecoderLayer, inputs: dict[str, torch.Tensor]) -> list[tuple[Linear, ...]]:
    """The layer's linears grouped by the input they read, in plan order."""
    groups: list[list[Linear]] = []
    for lin in layer.linears():
        for group in groups:
            if inputs[group[0].weight] is inputs[lin.weight]:
                group.append(lin)
                break
        else:
            groups.append([lin])
    return [tuple(g) for g in groups]


def _short(lin: Linear) -> str:
    return lin.weight.removesuffix(".weight").rsplit(".", 1)[-1]


# ---- the stage --------------------------------------------------------------------------------------

def _options(job: Job, request: QuantizeRequest) -> tuple[AwqOptions, GptqOptions]:
    """Calibration options (the request's, shared with AWQ) and the GPTQ options: the request's if
    it carries them, else the recipe's ``quantization.gptq``."""
    if request.gptq is not None:
        return request.awq or AwqOptions(), request.gptq
    recipe = job.recipe.quantization.gptq
    return request.awq or AwqOptions(), GptqOptions(damp=recipe.damp, act_order=recipe.act_order, mse=recipe.mse)


def gptq_quantize_checkpoint(job: Job, out: Path, request: QuantizeRequest) -> Path:
    """GPTQ into ``out`` through quant/calibrate.py's layer loop (resumable as AWQ is)."""
    calibration, options = _options(job, request)
    settings = job.settings

    def process(weights, inputs, layer, module, extra, tick) -> LayerWork:
        return gptq_layer(weights, inputs, layer, settings, options, calibration.min_tokens, tick=tick)

    meta = {"calibration": _calibration_meta(calibration), "gptq": asdict(options)}
    return calibrated_quantize(job, out, replace(request, awq=calibration), "gptq", process,
                               lambda layer: len(layer.linears()), meta, [_calibration_meta(calibration), options])


def awq_gptq_quantize_checkpoint(job: Job, out: Path, request: QuantizeRequest) -> Path:
    """AWQ's scale search and fold (no clip search), then GPTQ's rounding of the folded weights."""
    from phi3_export.quant import awq

    calibration, options = _options(job, request)
    calibration = replace(calibration, clip=False)
    settings = job.settings

    def process(weights, inputs, layer, module, extra, tick) -> LayerWork:
        done = awq.awq_layer(weights, inputs, layer, settings, calibration, seed=calibration.seed + layer.index,
                             module=module, extra=extra, tick=tick)
        work = gptq_layer(weights, inputs, layer, settings, options, calibration.min_tokens, done.input_scale, tick)
        work.rtn_fallback = sorted({*done.rtn_fallback, *work.rtn_fallback})
        return work

    meta = {"awq": asdict(calibration), "gptq": asdict(options)}
    return calibrated_quantize(job, out, replace(request, awq=calibration), "awq-gptq", process,
                               lambda layer: awq.layer_steps(layer) + len(layer.linears()), meta, [calibration, options])


def _calibration_meta(calibration: AwqOptions) -> dict:
    """The calibration part of the AWQ options (GPTQ runs no AWQ search)."""
    return {"samples": calibration.samples, "seqlen": calibration.seqlen, "seed": calibration.seed,
            "min_tokens": calibration.min_tokens}
