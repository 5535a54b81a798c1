"""ONNX emitters for the plan's block kinds: one function per kind, looked up by the kind.

``NORM_EMITTERS`` turn (residual, pending block output) into (normalised input, new
residual), folding the residual add into the norm (Skip*LayerNormalization) as the ORT-GenAI
builder does. ``BLOCK_EMITTERS`` emit an attention or feed-forward block and return its
output. A new block kind is a function here and an entry in its table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from phi3_export.arch.plan import Attention, Mlp, Norm
from phi3_export.errors import Phi3ExportError

if TYPE_CHECKING:
    from phi3_export.export.onnx.decoder import DecoderEmitter

MS = "com.microsoft"


def emitter_for(table: dict[str, Callable], kind: str) -> Callable:
    try:
        return table[kind]
    except KeyError:
        raise Phi3ExportError(f"ONNX export: block kind {kind!r} is not supported yet") from None


# ---- norms ----------------------------------------------------------------------------------

def rms_norm(em: DecoderEmitter, norm: Norm, residual: str, pending: str | None, path: str, final: bool = False) -> tuple[str, str]:
    weight = em.float_param(norm.weight)
    if pending is None:
        h = em.node("SimplifiedLayerNormalization", [residual, weight], f"{path}/LayerNorm", axis=-1, epsilon=norm.eps,
                    stash_type=1)[0]
        return h, residual
    outputs = em.node("SkipSimplifiedLayerNormalization", [residual, pending, weight], f"{path}/SkipLayerNorm",
                      n_out=1 if final else 4, domain=MS, epsilon=norm.eps)
    return outputs[0], outputs[-1]


def layer_norm(em: DecoderEmitter, norm: Norm, residual: str, pending: str | None, path: str, final: bool = False) -> tuple[str, str]:
    """LayerNorm with bias (PhiMoE): y = (x - mean) / std * weight + bias."""
    weight = em.float_param(norm.weight)
    bias = em.float_param(norm.bias)
    if pending is None:
        h = em.node("LayerNormalization", [residual, weight, bias], f"{path}/LayerNorm", axis=-1, epsilon=norm.eps, stash_type=1)[0]
        return h, residual
    outputs = em.node("SkipLayerNormalization", [residual, pending, weight, bias], f"{path}/SkipLayerNorm",
                      n_out=1 if final else 4, domain=MS, epsilon=norm.eps)
    return outputs[0], outputs[-1]


NORM_EMITTERS: dict[str, Callable] = {"rms": rms_norm, "layer": layer_norm}


# ---- attention --------------------------------------------------------------------------------

def dense_attention(em: DecoderEmitter, attn: Attention, h: str, i: int, shared: dict[str, str]) -> str:
    """GroupQueryAttention (rotary inside, KV cache shared past/present) on fused or separate q/k/v."""
    p = f"/model/layers.{i}/attn"
    if attn.qkv is not None:
        qkv = [em.linear(h, attn.qkv, f"{p}/qkv_proj"), "", ""]
    else:
        qkv = [em.linear(h, lin, f"{p}/{part}_proj") for part, lin in (("q", attn.q), ("k", attn.k), ("v", attn.v))]
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


BLOCK_EMITTERS: dict[str, Callable] = {"dense": dense_attention, "swiglu": swiglu_mlp}
