"""ONNX emitters for the plan's block kinds: one function per kind, looked up by the kind.

``NORM_EMITTERS`` turn (residual, pending block output) into (normalised input, new
residual), folding the residual add into the norm (Skip*LayerNormalization) as the ORT-GenAI
builder does. ``BLOCK_EMITTERS`` emit an attention or feed-forward block and return its
output. A new block kind is a function here and an entry in its table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from onnx import TensorProto, numpy_helper

from phi3_export.arch.plan import Attention, Linear, Mlp, Moe, Norm
from phi3_export.errors import Phi3ExportError
from phi3_export.quant.qcheckpoint import pack_codes

if TYPE_CHECKING:
    from phi3_export.export.onnx.decoder import DecoderEmitter

MS = "com.microsoft"


def emitter_for(table: dict[str, Callable], kind: str) -> Callable:
    try:
        return table[kind]
    except KeyError:
        raise Phi3ExportError(f"ONNX export: block kind {kind!r} is not supported yet") from None


# ---- norms ----------------------------------------------------------------------------------

def rms_norm(em: DecoderEmitter, norm: Norm, residual: str, pending: str | None, path: str, final: bool = False,
             scale: float = 1.0) -> tuple[str, str]:
    """RMSNorm; ``scale`` (a power of two: exact) multiplies its output through the weight."""
    weight = em.float_param(norm.weight, scale=scale)
    if pending is None:
        h = em.node("SimplifiedLayerNormalization", [residual, weight], f"{path}/LayerNorm", axis=-1, epsilon=norm.eps,
                    stash_type=1)[0]
        return h, residual
    outputs = em.node("SkipSimplifiedLayerNormalization", [residual, pending, weight], f"{path}/SkipLayerNorm",
                      n_out=1 if final else 4, domain=MS, epsilon=norm.eps)
    return outputs[0], outputs[-1]


def layer_norm(em: DecoderEmitter, norm: Norm, residual: str, pending: str | None, path: str, final: bool = False,
               scale: float = 1.0) -> tuple[str, str]:
    """LayerNorm with bias (PhiMoE, Phi-3-small): y = (x - mean) / std * weight + bias, times ``scale``
    folded into weight and bias."""
    weight = em.float_param(norm.weight, scale=scale)
    bias = em.float_param(norm.bias, scale=scale)
    if pending is None:
        h = em.node("LayerNormalization", [residual, weight, bias], f"{path}/LayerNorm", axis=-1, epsilon=norm.eps, stash_type=1)[0]
        return h, residual
    outputs = em.node("SkipLayerNormalization", [residual, pending, weight, bias], f"{path}/SkipLayerNorm",
                      n_out=1 if final else 4, domain=MS, epsilon=norm.eps)
    return outputs[0], outputs[-1]


NORM_EMITTERS: dict[str, Callable] = {"rms": rms_norm, "layer": layer_norm}


# ---- attention --------------------------------------------------------------------------------

def _qkv(em: DecoderEmitter, attn: Attention, h: str, p: str) -> list[str]:
    """[packed q|k|v, "", ""] from a fused projection (rows in parts order), else [q, k, v]."""
    if attn.qkv is not None:
        return [em.linear(h, attn.qkv, f"{p}/qkv_proj"), "", ""]
    return [em.linear(h, lin, f"{p}/{part}_proj") for part, lin in (("q", attn.q), ("k", attn.k), ("v", attn.v))]


def dense_attention(em: DecoderEmitter, attn: Attention, h: str, i: int, shared: dict[str, str]) -> str:
    """GroupQueryAttention (rotary inside, KV cache shared past/present) on fused or separate q/k/v."""
    p = f"/model/layers.{i}/attn"
    qkv = _qkv(em, attn, h, p)
    window = attn.sliding_window if attn.sliding_window and attn.sliding_window < em.target.max_length else -1
    out, _, _ = em.node(
        "GroupQueryAttention",
        qkv + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", shared["seqlens"], shared["total"], shared["cos"], shared["sin"]],
        f"{p}/GroupQueryAttention", domain=MS,
        outputs=[f"{p}/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=attn.heads, kv_num_heads=attn.kv_heads, scale=float(attn.scale), do_rotary=1,
        rotary_interleaved=0, local_window_size=int(window),
    )
    return em.linear(out, attn.o, f"{p}/o_proj")


# SparseAttention's block sizes (onnxruntime's contrib op schema).
SPARSE_BLOCK_SIZES = (16, 32, 64, 128)


def blocksparse_layout(em: DecoderEmitter, attn: Attention) -> tuple[str, str]:
    """The CSR block layout initializers (one per distinct pattern in the graph), sized to max_length.

    SparseAttention derives its longest sequence from the layout's rows (blocks x block size),
    so the layout covers ceil(max_length / block) blocks; head h reads layout h % layouts.
    """
    bs = attn.blocksparse
    key = (bs, attn.heads)
    if key not in em.layouts:
        rows, cols = bs.csr(attn.heads, -(-em.target.max_length // bs.block))
        suffix = f"_{len(em.layouts)}" if em.layouts else ""
        em.layouts[key] = (em.weight(f"block_row_indices{suffix}", rows), em.weight(f"block_col_indices{suffix}", cols))
    return em.layouts[key]


def blocksparse_attention(em: DecoderEmitter, attn: Attention, h: str, i: int, shared: dict[str, str]) -> str:
    """SparseAttention (Phi-3-small): causal attention within the block pattern, rotary inside.

    The CPU kernel runs only with past and present KV sharing one buffer (past_present_share_buffer);
    it takes each sequence's unpadded key length (the attention mask's row sum), not GQA's length - 1.
    """
    p = f"/model/layers.{i}/attn"
    qkv = _qkv(em, attn, h, p)
    rows, cols = blocksparse_layout(em, attn)
    if "key_total" not in shared:
        shared["key_total"] = em.node("Cast", [shared["mask_sum"]], "/model/attn_mask_reformat/ReduceSum/Cast", to=TensorProto.INT32)[0]
    out, _, _ = em.node(
        "SparseAttention",
        qkv + [f"past_key_values.{i}.key", f"past_key_values.{i}.value", rows, cols, shared["total"], shared["key_total"],
               shared["cos"], shared["sin"]],
        f"{p}/SparseAttention", domain=MS,
        outputs=[f"{p}/SparseAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=attn.heads, kv_num_heads=attn.kv_heads, scale=float(attn.scale), sparse_block_size=attn.blocksparse.block,
        do_rotary=1, rotary_interleaved=0,
    )
    return em.linear(out, attn.o, f"{p}/o_proj")


def check_blocksparse(attn: Attention) -> str | None:
    """Why SparseAttention cannot run this block, or None."""
    if attn.blocksparse.block not in SPARSE_BLOCK_SIZES:
        return f"blocksparse block size {attn.blocksparse.block}: SparseAttention takes {', '.join(map(str, SPARSE_BLOCK_SIZES))}"
    if attn.head_dim % 16:
        return f"head size {attn.head_dim}: SparseAttention with rotary needs a multiple of 16"
    return None


# ---- feed-forward ----------------------------------------------------------------------------------

def swiglu_mlp(em: DecoderEmitter, mlp: Mlp, h: str, i: int, _shared: dict[str, str]) -> str:
    p = f"/model/layers.{i}/mlp"
    gate_up = em.linear(h, mlp.gate_up, f"{p}/gate_up_proj")
    sizes = mlp.gate_up.part_sizes()
    gate, up = em.node("Split", [gate_up, em.const(sizes)], f"{p}/Split", n_out=2, axis=-1)
    sig = em.node("Sigmoid", [gate], f"{p}/act_fn/Sigmoid")[0]
    act = em.node("Mul", [gate, sig], f"{p}/act_fn/Mul")[0]
    prod = em.node("Mul", [act, up], f"{p}/Mul")[0]
    return em.linear(prod, mlp.down, f"{p}/down_proj")


def geglu_mlp(em: DecoderEmitter, mlp: Mlp, h: str, i: int, _shared: dict[str, str]) -> str:
    """Phi-3-small's GEGLU: down(quick_gelu(min(g, limit)) * (clip(l, -limit, limit) + 1)).

    The clamps are plain Min / Clip: the published code lets an infinite value through
    unclamped (torch.where(isinf)), which only differs once an activation has overflowed.
    """
    p = f"/model/layers.{i}/mlp"
    gate_up = em.linear(h, mlp.gate_up, f"{p}/up_proj")
    gate, linear = em.node("Split", [gate_up, em.const(mlp.gate_up.part_sizes())], f"{p}/Split", n_out=2, axis=-1)
    if mlp.limit is not None:
        limit = em.const(mlp.limit, em.io)
        gate = em.node("Min", [gate, limit], f"{p}/gate/Min")[0]
        linear = em.node("Clip", [linear, em.const(-mlp.limit, em.io), limit], f"{p}/linear/Clip")[0]
    scaled = em.node("Mul", [gate, em.const(1.702, em.io)], f"{p}/act_fn/Mul_alpha")[0]
    sig = em.node("Sigmoid", [scaled], f"{p}/act_fn/Sigmoid")[0]
    act = em.node("Mul", [gate, sig], f"{p}/act_fn/Mul")[0]
    shifted = em.node("Add", [linear, em.const(1.0, em.io)], f"{p}/linear/Add")[0]
    prod = em.node("Mul", [act, shifted], f"{p}/Mul")[0]
    return em.linear(prod, mlp.down, f"{p}/down_proj")


# ---- mixture of experts ------------------------------------------------------------------------------

def sparsemixer_weights(em: DecoderEmitter, moe: Moe, logits: str, p: str) -> str:
    """Dense [tokens, experts] routing weights, zero but at the chosen experts (Phi-3.5-MoE's routing).

    Choice k takes the top logit of those not chosen yet and weighs it by a softmax over the
    experts whose logit lies within 2 * jitter_eps of it, relative to max(|logit|, chosen):
    transformers' eval-mode ``sparsemixer``. TopK breaks ties to the lower index, as torch.max does.
    """
    neg_inf, two_eps = em.const(-np.inf, np.float32), em.const(2 * moe.jitter_eps, np.float32)
    magnitude = em.node("Abs", [logits], f"{p}/Abs")[0]
    remaining, indices, weights = logits, [], []
    for k in range(moe.top_k):
        q = f"{p}/choice_{k}"
        top, index = em.node("TopK", [remaining, em.const([1])], f"{q}/TopK", n_out=2, axis=-1)
        factor = em.node("Max", [magnitude, top], f"{q}/Max")[0]
        gap = em.node("Div", [em.node("Sub", [top, logits], f"{q}/Sub")[0], factor], f"{q}/Div")[0]
        outside = em.node("Greater", [gap, two_eps], f"{q}/Greater")[0]
        masked = em.node("Where", [outside, neg_inf, remaining], f"{q}/Where")[0]
        probs = em.node("Softmax", [masked], f"{q}/Softmax", axis=-1)[0]
        weights.append(em.node("GatherElements", [probs, index], f"{q}/GatherElements", axis=-1)[0])
        indices.append(index)
        if k + 1 < moe.top_k:  # the chosen expert is out of the running for the next choice
            fill = em.node("Expand", [neg_inf, em.node("Shape", [index], f"{q}/Shape")[0]], f"{q}/Expand")[0]
            remaining = em.node("ScatterElements", [remaining, index, fill], f"{q}/ScatterElements", axis=-1)[0]
    chosen = em.node("Concat", indices, f"{p}/indices/Concat", axis=-1)[0]
    chosen_weights = em.node("Concat", weights, f"{p}/weights/Concat", axis=-1)[0]
    zeros = em.node("ConstantOfShape", [em.node("Shape", [logits], f"{p}/Shape")[0]], f"{p}/ConstantOfShape",
                    value=numpy_helper.from_array(np.zeros(1, np.float32)))[0]
    return em.node("ScatterElements", [zeros, chosen, chosen_weights], f"{p}/ScatterElements", axis=-1)[0]


ROUTING: dict[str, Callable] = {"sparsemixer": sparsemixer_weights}


def _interleave(*arrays: np.ndarray) -> np.ndarray:
    """Rows a0, b0, a1, b1, ...: gate|up fused the way QMoE's swiglu_fusion=1 reads fc1."""
    return np.stack(arrays, axis=1).reshape(-1, *arrays[0].shape[1:])


def _expert_precision(em: DecoderEmitter, moe: Moe) -> tuple[int, int]:
    """(bits, block size) shared by every expert weight, (0, 0) if float: QMoE takes one setting for all."""
    infos = [em.qckpt.info(lin.weight) for x in moe.experts for lin in x.linears()]
    settings = {(i.get("bits", 0), i.get("block_size", 0)) for i in infos}
    if len(settings) > 1:
        raise Phi3ExportError("ONNX export: every expert weight must share one precision and block size (QMoE takes one "
                              "setting); check the recipe's overrides of expert_gate / expert_up / expert_down")
    bits, block = settings.pop()
    for lin in (moe.experts[0].gate, moe.experts[0].down):
        if bits and lin.shape[1] % block:
            raise Phi3ExportError(f"ONNX export: QMoE needs the block size ({block}) to divide {lin.shape[1]} ({lin.weight})")
    return bits, block


def _fc_parts(em: DecoderEmitter, linears: tuple[Linear, ...], bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One expert's fc weight as QMoE reads it: packed codes, scales, packed zero points (rows interleaved)."""
    stored = [em.qckpt.packed(lin.weight) for lin in linears]
    codes, scales, zeros = (_interleave(*[t[k].numpy() for t in stored]) for k in range(3))
    return codes, scales, zeros if bits == 8 else pack_codes(torch.from_numpy(zeros), 4).numpy()


def _expert_initializers(em: DecoderEmitter, moe: Moe, bits: int, block: int, base: str) -> dict[str, str]:
    """fc1 (gate|up interleaved) and fc2 initializers, written one expert at a time."""
    experts, io = moe.experts, em.io
    hidden, inter = moe.router.shape[1], moe.intermediate
    fcs = {"fc1": (lambda x: (x.gate, x.up), 2 * inter, hidden), "fc2": (lambda x: (x.down,), hidden, inter)}
    names: dict[str, str] = {}
    if not bits:  # float experts (--bits 32 / 16): [experts, out, in]
        for fc, (pick, rows, cols) in fcs.items():
            blocks = (_interleave(*[em.qckpt.float(lin.weight).numpy() for lin in pick(x)])[None] for x in experts)
            names[fc] = em.weight_rows(f"{base}.{fc}.weight", (len(experts), rows, cols), io, blocks)
        return names
    # QMoE's default zero point is 2**(bits-1), as MatMulNBits': give them only when some block differs.
    default = 2 ** (bits - 1)
    explicit = any(not torch.all(em.qckpt.packed(lin.weight)[2] == default) for x in experts for lin in x.linears())
    for fc, (pick, rows, cols) in fcs.items():
        n_blocks = cols // block
        shapes = [(rows, cols * bits // 8), (rows, n_blocks), (rows, n_blocks if bits == 8 else -(-n_blocks // 2))]
        suffixes = [f"weight_Q{bits}", "weight_scales", "weight_zp"]
        for k, (suffix, shape) in enumerate(zip(suffixes, shapes)):
            if k == 2 and not explicit:
                names[f"{fc}_zp"] = ""
                continue
            dtype = io if k == 1 else np.uint8
            blocks = (_fc_parts(em, pick(x), bits)[k].astype(dtype)[None] for x in experts)
            names[f"{fc}_{('codes', 'scales', 'zp')[k]}"] = em.weight_rows(f"{base}.{fc}.{suffix}", (len(experts), *shape), dtype, blocks)
    return names


def moe_block(em: DecoderEmitter, moe: Moe, h: str, i: int, _shared: dict[str, str]) -> str:
    """Router (float MatMul) -> routing weights computed in the graph -> QMoE (int experts) or MoE (float).

    The CPU QMoE kernel ignores ``use_sparse_mixer`` (plain softmax top-k comes out), so the
    routing weights are computed here and passed as ``router_weights``; they are passed as
    ``router_probs`` too, since QMoE picks its experts from router_probs and on tied logits its
    top-k prefers the higher index, sparsemixer the lower.
    """
    p = f"/model/layers.{i}/moe"
    x = em.node("Reshape", [h, em.const([-1, moe.router.shape[1]])], f"{p}/Reshape")[0]
    logits = em.linear(x, moe.router, f"{p}/router")
    weights = emitter_for(ROUTING, moe.routing)(em, moe, logits, f"{p}/routing")
    bits, block = _expert_precision(em, moe)
    fc = _expert_initializers(em, moe, bits, block, f"model.layers.{i}.moe")
    if bits:
        inputs = [x, weights, fc["fc1_codes"], fc["fc1_scales"], "", fc["fc2_codes"], fc["fc2_scales"], "", "", "", "",
                  fc["fc1_zp"], fc["fc2_zp"], "", weights]
        out = em.node("QMoE", inputs, f"{p}/QMoE", domain=MS, k=moe.top_k, activation_type="swiglu", swiglu_fusion=1,
                      expert_weight_bits=bits, block_size=block, normalize_routing_weights=0, use_sparse_mixer=0,
                      accuracy_level=em.target.accuracy_level)[0]
    else:
        # The float MoE op has no router_weights input and renormalises softmax(router_probs) over
        # its top k: log(weights) makes that weights / their sum, and the per-token sum multiplied
        # back restores the weights exactly.
        log_weights = em.node("Log", [weights], f"{p}/Log")[0]
        out = em.node("MoE", [x, log_weights, fc["fc1"], "", fc["fc2"]], f"{p}/MoE", domain=MS, k=moe.top_k,
                      activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1, use_sparse_mixer=0)[0]
        total = em.node("ReduceSum", [weights, em.const([-1])], f"{p}/ReduceSum", keepdims=1)[0]
        out = em.node("Mul", [out, total], f"{p}/Mul")[0]
    return em.node("Reshape", [out, em.node("Shape", [h], f"{p}/Shape")[0]], f"{p}/Reshape_out")[0]


BLOCK_EMITTERS: dict[str, Callable] = {"dense": dense_attention, "blocksparse": blocksparse_attention, "swiglu": swiglu_mlp,
                                        "geglu": geglu_mlp, "moe": moe_block}
# Contrib ops a block kind may emit beyond the common ones (targets refuse kinds by op: targets.py).
BLOCK_OPS: dict[str, tuple[str, ...]] = {"moe": ("QMoE", "MoE"), "blocksparse": ("SparseAttention",)}
# Checks a block kind's settings must pass before anything is quantized: the reason, or None.
BLOCK_CHECKS: dict[str, Callable] = {"blocksparse": check_blocksparse}
