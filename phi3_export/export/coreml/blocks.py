"""The Core ML program's block emitters, looked up by the plan's ``kind`` in ``NORMS`` and ``BLOCKS``.

Each emitter writes its ops into the current MIL builder context through ``prog`` (a
``program.DecoderProgram``: weights, rotary, KV cache) and returns the block's output.

Norms run in fp32 and come back to fp16 before their weight (and bias): squares of the
residual stream overflow fp16. Attention is Core ML's ``scaled_dot_product_attention``,
which scales q.k by 1/sqrt(head_dim); a plan with another scale (muP's 1/head_dim) gets q
multiplied by the ratio first. Blocksparse attention is the same attention with a per-head
additive mask (``blocksparse_bias``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from phi3_export.arch.blocksparse import BlockSparse
from phi3_export.arch.plan import Attention, Mlp, Norm
from phi3_export.errors import Phi3ExportError
from phi3_export.export.coreml.ct import coremltools

coremltools()
from coremltools.converters.mil import Builder as mb


# ---- norms ------------------------------------------------------------------------------------
def rms_norm(prog, x, norm: Norm, op_name: str):
    x32 = mb.cast(x=x, dtype="fp32", name=f"{op_name}_fp32")
    mean_sq = mb.reduce_mean(x=mb.mul(x=x32, y=x32, name=f"{op_name}_sq"), axes=[-1], keep_dims=True, name=f"{op_name}_mean")
    inv = mb.rsqrt(x=mean_sq, epsilon=np.float32(norm.eps), name=f"{op_name}_rsqrt")
    normed = mb.cast(x=mb.mul(x=x32, y=inv, name=f"{op_name}_scaled"), dtype="fp16", name=f"{op_name}_fp16")
    return mb.mul(x=normed, y=prog.weight(norm.weight, f"{op_name}_weight"), name=op_name)


def layer_norm(prog, x, norm: Norm, op_name: str):
    """LayerNorm with weight and bias (Phi-3-small): mean and variance in fp32."""
    x32 = mb.cast(x=x, dtype="fp32", name=f"{op_name}_fp32")
    normed = mb.layer_norm(x=x32, axes=[-1], epsilon=np.float32(norm.eps), name=f"{op_name}_normed")
    normed = mb.cast(x=normed, dtype="fp16", name=f"{op_name}_fp16")
    if norm.bias is None:
        return mb.mul(x=normed, y=prog.weight(norm.weight, f"{op_name}_weight"), name=op_name)
    scaled = mb.mul(x=normed, y=prog.weight(norm.weight, f"{op_name}_weight"), name=f"{op_name}_scaled")
    return mb.add(x=scaled, y=mb.const(val=prog.weights.float16(norm.bias), name=f"{op_name}_bias"), name=op_name)


# ---- attention --------------------------------------------------------------------------------
def attend(prog, attn: Attention, h, i: int, shared: dict, bias, layouts: int = 0):
    """q/k/v projections, RoPE, the KV cache, attention under the additive ``bias``, o_proj.

    With ``layouts``, ``bias`` is [1, 1, layouts, q, end]: one mask per head layout, broadcast
    over the heads that share it rather than repeated for each.
    """
    p = f"layers_{i}"
    if attn.qkv is not None:
        qkv = prog.linear(h, attn.qkv, f"{p}_qkv_proj")  # rows in parts order: q|k|v by size
        q, k, v = mb.split(x=qkv, split_sizes=attn.qkv.part_sizes(), axis=-1, name=f"{p}_qkv_split")
    else:
        q, k, v = (prog.linear(h, lin, f"{p}_{part}_proj") for part, lin in (("q", attn.q), ("k", attn.k), ("v", attn.v)))
    cos, sin, past, end = shared["cos"], shared["sin"], shared["past"], shared["end"]
    q = prog.rotate(prog.heads_first(q, attn.heads, f"{p}_q"), attn.heads, cos, sin, f"{p}_q_rope")
    k = prog.rotate(prog.heads_first(k, attn.kv_heads, f"{p}_k"), attn.kv_heads, cos, sin, f"{p}_k_rope")
    v = prog.heads_first(v, attn.kv_heads, f"{p}_v")
    ratio = attn.scale * math.sqrt(attn.head_dim)  # scaled_dot_product_attention divides by sqrt(head_dim)
    if not math.isclose(ratio, 1.0, rel_tol=1e-6):
        q = mb.mul(x=q, y=np.float16(ratio), name=f"{p}_q_scaled")
    keys = prog.expand_kv(prog.cache_update(shared["states"][0], k, i, past, end, f"{p}_key_cache"), attn, f"{p}_keys")
    values = prog.expand_kv(prog.cache_update(shared["states"][1], v, i, past, end, f"{p}_value_cache"), attn, f"{p}_values")
    if layouts:  # heads as [heads / layouts, layouts]: head h = a * layouts + h % layouts reads the mask's layout h % layouts
        q, keys, values = (mb.reshape(x=t, shape=[1, attn.heads // layouts, layouts, -1, attn.head_dim], name=f"{p}_{tag}_by_layout")
                           for t, tag in ((q, "q"), (keys, "keys"), (values, "values")))
    out = mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=bias, name=f"{p}_attention")
    if layouts:
        out = mb.reshape(x=out, shape=[1, attn.heads, -1, attn.head_dim], name=f"{p}_attention_heads")
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3], name=f"{p}_attention_t"), shape=[1, -1, attn.heads * attn.head_dim],
                     name=f"{p}_attention_merged")
    return prog.linear(out, attn.o, f"{p}_o_proj")


def dense_attention(prog, attn: Attention, h, i: int, shared: dict):
    return attend(prog, attn, h, i, shared, shared["bias"])


def blocksparse_bias(prog, pattern: BlockSparse, heads: int, shared: dict):
    """([1, 1, layouts, q, end] additive mask, layouts): the shared causal bias + which key blocks
    each head layout's query blocks see (head h uses layout h % layouts).

    One constant holds the pattern: the block mask of the distinct layouts, [layouts, n_blocks,
    n_blocks] fp16 of 0 / -inf, n_blocks = context / block. Phi-3-small (32 heads, stride 8:
    8 layouts, blocks of 64) at an 8192 context: 8 x 128 x 128 x 2 bytes = 256 KiB, where a
    token-level [heads, ctx, ctx] mask would be 4 GiB in fp16. At run time its rows are
    gathered by the queries' blocks and its columns by the keys' blocks: [layouts, q, end] fp16,
    a quarter of a per-head mask (decode: 8 x 8192 x 2 = 128 KiB; a 2048-token prefill at a
    2048 context: 64 MiB). Built once; every blocksparse layer reads it.
    """
    key = ("blocksparse", pattern, heads)
    if key in shared:
        return shared[key]
    n_blocks = -(-prog.ctx // pattern.block)
    layouts = pattern.layouts(heads)
    visible = pattern.block_mask(heads, n_blocks)[:layouts]
    table = mb.const(val=np.where(visible, np.float16(0), np.float16(-np.inf)), name="blocksparse_block_bias")
    block = np.int32(pattern.block)
    query_blocks = mb.floor_div(x=shared["positions"], y=block, name="blocksparse_query_blocks")
    key_blocks = mb.floor_div(x=shared["key_positions"], y=block, name="blocksparse_key_blocks")
    rows = mb.gather(x=table, indices=query_blocks, axis=1, name="blocksparse_rows")  # [layouts, q, n_blocks]
    mask = mb.gather(x=rows, indices=key_blocks, axis=2, name="blocksparse_layouts")  # [layouts, q, end]
    mask = mb.add(x=shared["bias"], y=mask, name="blocksparse_bias_4d")  # [1, layouts, q, end]
    shared[key] = (mb.expand_dims(x=mask, axes=[1], name="blocksparse_bias"), layouts)
    return shared[key]


def blocksparse_attention(prog, attn: Attention, h, i: int, shared: dict):
    if attn.blocksparse is None:
        raise Phi3ExportError(f"layer {i}: blocksparse attention without its pattern in the plan")
    bias, layouts = blocksparse_bias(prog, attn.blocksparse, attn.heads, shared)
    return attend(prog, attn, h, i, shared, bias, layouts)


# ---- MLPs -------------------------------------------------------------------------------------
def swiglu_mlp(prog, mlp: Mlp, h, i: int, _shared: dict):
    p = f"layers_{i}"
    gate_up = prog.linear(h, mlp.gate_up, f"{p}_gate_up_proj")
    gate, up = mb.split(x=gate_up, split_sizes=mlp.gate_up.part_sizes(), axis=-1, name=f"{p}_gate_up_split")
    act = mb.mul(x=mb.silu(x=gate, name=f"{p}_silu"), y=up, name=f"{p}_mlp_act")
    return prog.linear(act, mlp.down, f"{p}_down_proj")


def geglu_mlp(prog, mlp: Mlp, h, i: int, _shared: dict):
    """down(quick_gelu(min(g, limit)) * (clip(l, -limit, limit) + 1)); gate_up's interleaved rows
    come in parts order (gate|linear), so the split is by size."""
    p = f"layers_{i}"
    gate_up = prog.linear(h, mlp.gate_up, f"{p}_gate_up_proj")
    gate, lin = mb.split(x=gate_up, split_sizes=mlp.gate_up.part_sizes(), axis=-1, name=f"{p}_gate_up_split")
    if mlp.limit is not None:
        limit = np.float16(mlp.limit)
        gate = mb.minimum(x=gate, y=limit, name=f"{p}_gate_clamped")
        lin = mb.clip(x=lin, alpha=-limit, beta=limit, name=f"{p}_linear_clamped")
    act = mb.gelu(x=gate, mode="SIGMOID_APPROXIMATION", name=f"{p}_quick_gelu")  # x * sigmoid(1.702 x)
    act = mb.mul(x=act, y=mb.add(x=lin, y=np.float16(1), name=f"{p}_linear_plus_one"), name=f"{p}_mlp_act")
    return prog.linear(act, mlp.down, f"{p}_down_proj")


NORMS: dict[str, Callable] = {"rms": rms_norm, "layer": layer_norm}
BLOCKS: dict[str, Callable] = {"dense": dense_attention, "blocksparse": blocksparse_attention,
                               "swiglu": swiglu_mlp, "geglu": geglu_mlp}


def lookup(table: dict[str, Callable], kind: str) -> Callable:
    try:
        return table[kind]
    except KeyError:
        raise Phi3ExportError(f"Core ML export: block kind {kind!r} is not supported yet") from None
