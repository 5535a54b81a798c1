"""AWQ's searches: each closed form equals the direct computation it replaces, the cheaper
searches pick what the exhaustive ones pick on smooth problems, and never lose to plain RTN."""

import math

import pytest
import torch

from phi3_export.arch.plan import KvLayout, Linear, Norm, ScalingGroup
from phi3_export.quant import awq_search as search
from phi3_export.quant.awq_search import AwqOptions, fake_quant, search_clip, search_scale
from phi3_export.quant.rtn import quantize_rtn
from phi3_export.quant.settings import Storage

STORAGES = [Storage("int4", 32, True), Storage("int4", 128, False), Storage("int8", 32, False), Storage("int4", 64, True)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activations(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activation-like: a few channels far larger than the rest, as in real models."""
    x = torch.randn(tokens, cols, generator=gen(seed))
    return x * torch.exp(torch.randn(cols, generator=gen(seed + 1)))[None, :]


def group(cols: int, rows: int, kv: KvLayout | None = None) -> ScalingGroup:
    return ScalingGroup(prev=Norm("rms", "norm.weight", 1e-5), linears=(Linear("lin.weight", "lin", (rows, cols)),),
                        kv_shared=kv)


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: f"{s.label}{'s' if s.symmetric else 'a'}")
def test_fake_quant_in_place_is_quantize_dequantize_bit_for_bit(storage):
    w = torch.randn(48, 256, generator=gen(0)) * 0.02
    w[3, : storage.block_size] = 0  # an all-zero block: scale 0
    w[5, : storage.block_size] = w[5, : storage.block_size].abs()  # a block without negatives
    expected = quantize_rtn(w, storage.bits, storage.block_size, storage.symmetric).dequantize()
    assert torch.equal(fake_quant(w, storage), expected)
    s = torch.exp(torch.randn(256, generator=gen(1)) * 0.3)
    direct = quantize_rtn(w * s, storage.bits, storage.block_size, storage.symmetric).dequantize() / s
    assert torch.equal(search._scaled_fake_quant(w, s, storage), direct)


def test_linear_scorer_screens_on_a_quarter_of_the_tokens():
    x, w = activations(1024, 96), torch.randn(64, 96, generator=gen(2))
    candidate = [w[:40] + 0.01 * torch.randn(40, 96, generator=gen(3)), w[40:] + 0.01 * torch.randn(24, 96, generator=gen(4))]
    score = search.linear_scorer(x, w)
    assert score(candidate) == pytest.approx(search._output_error(x, w, torch.cat(candidate)), rel=1e-6)
    assert score.screen(candidate) == pytest.approx(search._output_error(x[:256], w, torch.cat(candidate)), rel=1e-6)
    assert not hasattr(search.linear_scorer(x[:256], w), "screen")  # nothing fewer to screen on


def test_clip_gram_closed_form_equals_the_direct_block_error():
    x, w = activations(200, 256, seed=5), torch.randn(16, 256, generator=gen(6)) * 0.02
    storage = Storage("int4", 64, False)
    wb = w.view(16, 4, 64).transpose(0, 1).contiguous()  # [blocks, rows, block]
    lo, hi = torch.aminmax(wb, dim=-1, keepdim=True)
    ratio = 0.8
    got = search.clip_errors(wb, lo, hi, ratio, search.block_gram(x, 64), storage)  # [blocks, rows]
    q = fake_quant(torch.clamp(w.view(16, 4, 64), lo.transpose(0, 1) * ratio, hi.transpose(0, 1) * ratio).reshape(16, 256),
                   storage)
    xb = x.view(200, 4, 64)
    direct = (torch.einsum("tgb,ogb->tog", xb, q.view(16, 4, 64) - w.view(16, 4, 64))).pow(2).mean(dim=0)  # [rows, blocks]
    torch.testing.assert_close(got, direct.T, rtol=1e-4, atol=1e-9)


def direct_clip(x: torch.Tensor, w: torch.Tensor, storage: Storage, options: AwqOptions) -> torch.Tensor:
    """The search as it was before the closed form: every ratio, scored on the tokens themselves."""
    rows, cols = w.shape
    block = storage.block_size
    nb = cols // block
    xb, wb = x.view(x.shape[0], nb, block), w.view(rows, nb, block)
    ref = torch.einsum("tgb,ogb->tog", xb, wb)
    hi, lo = (wb.abs().amax(-1, keepdim=True), -wb.abs().amax(-1, keepdim=True)) if storage.symmetric else \
        (wb.amax(-1, keepdim=True), wb.amin(-1, keepdim=True))
    best_err, best = torch.full((rows, nb), math.inf), wb.clone()
    for k in range(options.clip_grid):
        ratio = 1 - options.max_shrink * k / options.clip_grid
        clipped = torch.maximum(torch.minimum(wb, hi * ratio), lo * ratio)
        q = fake_quant(clipped.reshape(rows, cols), storage).view_as(wb)
        err = (torch.einsum("tgb,ogb->tog", xb, q) - ref).pow(2).mean(dim=0)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better[..., None], clipped, best)
    return best.view(rows, cols)


def block_errors(x: torch.Tensor, w: torch.Tensor, clipped: torch.Tensor, storage: Storage) -> torch.Tensor:
    rows = w.shape[0]
    d = (fake_quant(clipped, storage) - w).view(rows, -1, storage.block_size)
    return torch.einsum("tgb,ogb->tog", x.view(x.shape[0], -1, storage.block_size), d).pow(2).mean(dim=0)


@pytest.mark.parametrize("storage", [Storage("int4", 64, False), Storage("int4", 32, True)], ids=["g64a", "g32s"])
def test_exhaustive_clip_search_matches_the_direct_search(storage):
    x, w = activations(256, 256, seed=7), torch.randn(40, 256, generator=gen(8)) * 0.02
    options = AwqOptions(clip_refine=False)
    new, old = search_clip(x, w, storage, options, row_chunk=16), direct_clip(x, w, storage, options)
    new_err, old_err = block_errors(x, w, new, storage), block_errors(x, w, old, storage)
    assert (new == old).all(dim=1).float().mean() > 0.9  # the same choice in (nearly) every block
    assert (new_err <= old_err * (1 + 1e-4) + 1e-12).all()  # and never a worse one on the shared score


def test_refined_clip_search_never_loses_to_no_clipping():
    x, w = activations(256, 256, seed=9), torch.randn(40, 256, generator=gen(10)) * 0.02
    storage = Storage("int4", 64, False)
    exhaustive = block_errors(x, w, search_clip(x, w, storage, AwqOptions(clip_refine=False)), storage)
    refined = block_errors(x, w, search_clip(x, w, storage, AwqOptions()), storage)
    unclipped = block_errors(x, w, w, storage)
    assert (refined <= unclipped * (1 + 1e-5) + 1e-12).all()
    assert (refined >= exhaustive * (1 - 1e-5) - 1e-12).all()
    assert refined.sum() <= 1.02 * exhaustive.sum()  # the per-block curves are nearly unimodal


def test_search_scale_never_scores_worse_than_plain_rtn():
    for seed in range(3):
        x = activations(1024, 128, seed=seed)
        weights = [torch.randn(96, 128, generator=gen(seed + 10)) * 0.02, torch.randn(32, 128, generator=gen(seed + 20))]
        storages = [Storage("int4", 32, False), Storage("int4", 64, True)]
        w = torch.cat(weights)
        score = search.linear_scorer(x, w)
        rtn = score([fake_quant(wi, st) for wi, st in zip(weights, storages)])
        for kwargs in ({}, {"keep": 0}, {"keep": 1}):
            s, alpha = search_scale(group(128, 128), x, weights, storages, 20, score, **kwargs)
            got = score([search._scaled_fake_quant(wi, s, st) for wi, st in zip(weights, storages)])
            assert got <= rtn * (1 + 1e-6)
            assert (alpha is None) == bool((s == 1).all())


def test_a_group_with_a_float_stored_linear_searches_on_the_quantized_ones():
    """A recipe override (e.g. ``qkv_proj: fp16``) can leave one linear of a group float: it is
    scored at its own precision (a scale then changes nothing for it), the others as stored."""
    x = activations(1024, 128, seed=3)
    weights = [torch.randn(96, 128, generator=gen(30)) * 0.02, torch.randn(32, 128, generator=gen(31))]
    storages = [Storage("fp16"), Storage("int4", 32, True)]
    assert torch.equal(fake_quant(weights[0], storages[0]), weights[0].half().float())
    score = search.linear_scorer(x, torch.cat(weights))
    rtn = score([fake_quant(wi, st) for wi, st in zip(weights, storages)])
    s, alpha = search_scale(group(128, 128), x, weights, storages, 20, score)
    assert alpha is not None and score([search._scaled_fake_quant(wi, s, st) for wi, st in zip(weights, storages)]) < rtn


def test_screened_search_keeps_the_exhaustive_winner_on_a_kv_shared_group():
    kv = KvLayout(kv_heads=2, n_rep=2, head_dim=32)  # 4 query heads of 32 read 2 KV heads
    x = activations(1024, 128, seed=3)
    weights = [torch.randn(64, 128, generator=gen(4)) * 0.02]
    g, storages = group(128, 64, kv), [Storage("int4", 32, False)]
    score = search.linear_scorer(x, weights[0])
    assert score.screen is not None  # 256 of the 1024 tokens
    calls = {"full": 0, "screen": 0}

    def counted(candidate, kind="full"):
        calls[kind] += 1
        return (score if kind == "full" else score.screen)(candidate)

    counted.screen = lambda candidate: counted(candidate, "screen")
    s_screened, alpha = search_scale(g, x, weights, storages, 20, counted)
    assert calls == {"full": 1 + search.SCREEN_KEEP, "screen": 20}  # RTN, the kept alphas; every alpha screened
    s_full, alpha_full = search_scale(g, x, weights, storages, 20, score, keep=0)
    assert s_screened.shape == (64,)
    assert alpha == alpha_full
    assert torch.equal(s_screened, s_full)
