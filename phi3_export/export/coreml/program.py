"""Builds the Core ML ML program (iOS 18 / macOS 15) of a Phi-3 decoder with coremltools' MIL builder.

No torch tracing: tracing would materialise every float weight (15 GB fp32 for Phi-3-mini).
The program is written op by op, a layer at a time, with each linear's int4 codes fed
straight into ``constexpr_blockwise_shift_scale`` from the quantized checkpoint.

Interface (the names swift-transformers' ``LanguageModel`` looks for):

    inputIds    int32 [1, q]             q in 1..context_length
    causalMask  fp16  [1, 1, m, end]     additive; m is q or 1 (broadcast); end = past + q
    keyCache    state fp16 [layers, 1, kv_heads, context_length, head_dim]
    valueCache  state fp16 (same shape)
    logits      fp32  [1, q, vocab]

The position of the first new token is ``end - q``: the caller says how many tokens the
cache already holds through the mask's last dimension. Causality and the sliding window
are applied inside the program, so an all-zero mask is enough (swift-transformers passes
zeros). Activations are fp16; RMSNorm runs in fp32, as transformers does, since squares of
Phi-3's residual stream overflow fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phi3_export.arch.base import Architecture
from phi3_export.export.coreml.contract import CAUSAL_MASK, INPUT_IDS, LOGITS
from phi3_export.export.coreml.ct import coremltools
from phi3_export.export.coreml.weights import WeightStore
from phi3_export.export.onnx.decoder import DecoderShape
from phi3_export.export.onnx.rotary import cos_sin

# Imported only when a Core ML export runs (artifact.py imports this module lazily).
ct = coremltools()
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types


@dataclass(frozen=True)
class ProgramShape:
    decoder: DecoderShape
    context_length: int


class DecoderProgram:
    """Emits the decoder's ops into the current MIL builder context."""

    def __init__(self, weights: WeightStore, arch: type[Architecture], shape: ProgramShape, rope: dict):
        self.w, self.arch, self.s, self.ctx, self.rope = weights, arch, shape.decoder, shape.context_length, rope
        self.tied_table = None

    # ---- weights ------------------------------------------------------------------------
    def weight(self, name: str, op_name: str):
        """A [rows, cols] weight: int blockwise constexpr if quantized, fp16 const otherwise."""
        if self.w.q.is_quantized(name):
            bw = self.w.blockwise(name)
            return mb.constexpr_blockwise_shift_scale(data=bw.data, scale=bw.scale, offset=bw.offset, name=op_name)
        return mb.const(val=self.w.float16(name), name=op_name)

    def linear(self, x, name: str, op_name: str):
        return mb.linear(x=x, weight=self.weight(name, f"{op_name}_weight"), name=op_name)

    def rms_norm(self, x, name: str, op_name: str):
        x32 = mb.cast(x=x, dtype="fp32", name=f"{op_name}_fp32")
        mean_sq = mb.reduce_mean(x=mb.mul(x=x32, y=x32, name=f"{op_name}_sq"), axes=[-1], keep_dims=True, name=f"{op_name}_mean")
        inv = mb.rsqrt(x=mean_sq, epsilon=np.float32(self.s.eps), name=f"{op_name}_rsqrt")
        normed = mb.cast(x=mb.mul(x=x32, y=inv, name=f"{op_name}_scaled"), dtype="fp16", name=f"{op_name}_fp16")
        return mb.mul(x=normed, y=self.weight(name, f"{op_name}_weight"), name=op_name)

    # ---- positions, masks, rotary ------------------------------------------------------------
    def positions(self, ids, mask):
        q_len = mb.squeeze(x=mb.slice_by_index(x=mb.shape(x=ids), begin=[1], end=[2]), axes=[0], name="q_len")
        end = mb.squeeze(x=mb.slice_by_index(x=mb.shape(x=mask), begin=[3], end=[4]), axes=[0], name="end")
        past = mb.sub(x=end, y=q_len, name="past")
        pos = mb.range_1d(start=past, end=end, step=np.int32(1), name="positions")
        return past, end, pos

    def attention_bias(self, mask, pos, end):
        """[1, 1, q, end] additive: the caller's mask + causal + sliding window."""
        keys = mb.range_1d(start=np.int32(0), end=end, step=np.int32(1), name="key_positions")
        dist = mb.sub(x=mb.expand_dims(x=pos, axes=[1]), y=mb.expand_dims(x=keys, axes=[0]), name="distance")
        allowed = mb.greater_equal(x=dist, y=np.int32(0), name="causal")
        window = self.s.sliding_window
        if window and window < self.ctx:
            allowed = mb.logical_and(x=allowed, y=mb.less(x=dist, y=np.int32(window)), name="causal_window")
        bias = mb.select(cond=allowed, a=np.float16(0), b=np.float16(-np.inf), name="bias")
        bias = mb.expand_dims(x=bias, axes=[0, 1], name="bias_4d")
        return mb.add(x=bias, y=mask, name="attention_bias")

    def rotary_tables(self, pos, end):
        dim, scale = self.s.rotary_dim, self.rope["attention_factor"]

        def rows(kind: str, factors):
            cos, sin = cos_sin(self.s.theta, dim, self.ctx, factors, scale)
            return [mb.reshape(x=mb.gather(x=table.astype(np.float16), indices=pos, axis=0), shape=[1, 1, -1, dim // 2],
                               name=f"rope_{part}{kind}") for part, table in (("cos", cos), ("sin", sin))]

        if self.rope["short_factor"] is None:
            return rows("", None)
        short = rows("_short", self.rope["short_factor"])
        long = rows("_long", self.rope["long_factor"])
        # transformers switches every position to the long factors once the sequence
        # outgrows the original context (the ONNX export's Where does the same).
        use_long = mb.greater(x=end, y=np.int32(self.s.original_context), name="rope_use_long")
        return [mb.select(cond=use_long, a=lo, b=sh, name=f"rope_{part}") for part, sh, lo in zip(("cos", "sin"), short, long)]

    def rotate(self, x, heads: int, cos, sin, op_name: str):
        """Rotary on the first rotary_dim dims of each head (halves, not interleaved)."""
        half, rot, hd = self.s.rotary_dim // 2, self.s.rotary_dim, self.s.head_dim

        def part(a: int, b: int, tag: str):
            return mb.slice_by_index(x=x, begin=[0, 0, 0, a], end=[1, heads, 0, b], end_mask=[False, False, True, False],
                                     name=f"{op_name}_{tag}")

        x1, x2 = part(0, half, "x1"), part(half, rot, "x2")
        r1 = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin), name=f"{op_name}_r1")
        r2 = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin), name=f"{op_name}_r2")
        pieces = [r1, r2] + ([part(rot, hd, "pass")] if rot < hd else [])
        return mb.concat(values=pieces, axis=-1, name=op_name)

    # ---- layers ---------------------------------------------------------------------------------
    def heads_first(self, x, heads: int, op_name: str):
        x = mb.reshape(x=x, shape=[1, -1, heads, self.s.head_dim], name=f"{op_name}_split_heads")
        return mb.transpose(x=x, perm=[0, 2, 1, 3], name=op_name)

    def cache_update(self, state, new, i: int, past, end, op_name: str):
        """Write ``new`` [1, kv, q, hd] at positions past..end of layer i; return [1, kv, end, hd] of it."""
        kv, hd = self.s.kv_heads, self.s.head_dim
        past1 = mb.expand_dims(x=past, axes=[0], name=f"{op_name}_past")
        end1 = mb.expand_dims(x=end, axes=[0], name=f"{op_name}_end")
        begin = mb.concat(values=[np.array([i, 0, 0], np.int32), past1, np.array([0], np.int32)], axis=0, name=f"{op_name}_begin")
        stop = mb.concat(values=[np.array([i + 1, 1, kv], np.int32), end1, np.array([hd], np.int32)], axis=0, name=f"{op_name}_stop")
        cache = mb.read_state(input=state, name=f"{op_name}_read")
        cache = mb.slice_update(x=cache, update=mb.expand_dims(x=new, axes=[0]), begin=begin, end=stop, name=f"{op_name}_write")
        cache = mb.coreml_update_state(state=state, value=cache, name=f"{op_name}_update")
        start = mb.concat(values=[np.array([i, 0, 0, 0, 0], np.int32)], axis=0, name=f"{op_name}_start")
        seen = mb.slice_by_index(x=cache, begin=start, end=stop, name=f"{op_name}_seen")
        return mb.reshape(x=seen, shape=[1, kv, -1, hd], name=f"{op_name}_layer")

    def expand_kv(self, x, op_name: str):
        """GQA: repeat each KV head for the query heads that read it (transformers' repeat_kv order)."""
        rep = self.s.heads // self.s.kv_heads
        if rep == 1:
            return x
        x = mb.reshape(x=x, shape=[1, self.s.kv_heads, 1, -1, self.s.head_dim], name=f"{op_name}_5d")
        x = mb.tile(x=x, reps=[1, 1, rep, 1, 1], name=f"{op_name}_tile")
        return mb.reshape(x=x, shape=[1, self.s.heads, -1, self.s.head_dim], name=op_name)

    def layer(self, i: int, residual, states, past, end, cos, sin, bias):
        s, a, p = self.s, self.arch, f"layers_{i}"
        h = self.rms_norm(residual, a.layer_tensor("input_layernorm", i), f"{p}_input_layernorm")
        qkv = self.linear(h, a.layer_tensor("qkv_proj", i), f"{p}_qkv_proj")
        q, k, v = mb.split(x=qkv, split_sizes=[s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim],
                           axis=-1, name=f"{p}_qkv_split")
        q = self.rotate(self.heads_first(q, s.heads, f"{p}_q"), s.heads, cos, sin, f"{p}_q_rope")
        k = self.rotate(self.heads_first(k, s.kv_heads, f"{p}_k"), s.kv_heads, cos, sin, f"{p}_k_rope")
        v = self.heads_first(v, s.kv_heads, f"{p}_v")
        keys = self.expand_kv(self.cache_update(states[0], k, i, past, end, f"{p}_key_cache"), f"{p}_keys")
        values = self.expand_kv(self.cache_update(states[1], v, i, past, end, f"{p}_value_cache"), f"{p}_values")
        attn = mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=bias, name=f"{p}_attention")
        attn = mb.reshape(x=mb.transpose(x=attn, perm=[0, 2, 1, 3], name=f"{p}_attention_t"), shape=[1, -1, s.heads * s.head_dim],
                          name=f"{p}_attention_merged")
        residual = mb.add(x=residual, y=self.linear(attn, a.layer_tensor("o_proj", i), f"{p}_o_proj"), name=f"{p}_attn_residual")
        h = self.rms_norm(residual, a.layer_tensor("post_attention_layernorm", i), f"{p}_post_attention_layernorm")
        gate_up = self.linear(h, a.layer_tensor("gate_up_proj", i), f"{p}_gate_up_proj")
        gate, up = mb.split(x=gate_up, split_sizes=[s.intermediate, s.intermediate], axis=-1, name=f"{p}_gate_up_split")
        act = mb.mul(x=mb.silu(x=gate, name=f"{p}_silu"), y=up, name=f"{p}_mlp_act")
        return mb.add(x=residual, y=self.linear(act, a.layer_tensor("down_proj", i), f"{p}_down_proj"), name=f"{p}_mlp_residual")

    def embedding(self, ids):
        table = self.weight(self.arch.embed, "embed_tokens_weight")
        if self.s.tied:
            self.tied_table = table  # one constant: the LM head reads the same codes
        return mb.gather(x=table, indices=ids, axis=0, name="embed_tokens")

    def lm_head(self, x):
        if self.s.tied:
            logits = mb.linear(x=x, weight=self.tied_table, name="lm_head")
        else:
            logits = self.linear(x, self.arch.lm_head, "lm_head")
        return mb.cast(x=logits, dtype="fp32", name=LOGITS)

    def build(self, ids, mask, key_cache, value_cache, progress_task=None):
        past, end, pos = self.positions(ids, mask)
        bias = self.attention_bias(mask, pos, end)
        cos, sin = self.rotary_tables(pos, end)
        x = self.embedding(ids)
        for i in range(self.s.layers):
            x = self.layer(i, x, (key_cache, value_cache), past, end, cos, sin, bias)
            self.w.q.close()  # its codes now live in the scratch files: unmap the layer's quantized file
            if progress_task is not None:
                progress_task.advance(f"layer {i}")
        return self.lm_head(self.rms_norm(x, self.arch.final_norm, "norm"))


def build_program(weights: WeightStore, arch: type[Architecture], shape: ProgramShape, rope: dict, progress_task=None):
    s, ctx = shape.decoder, shape.context_length
    cache = (s.layers, 1, s.kv_heads, ctx, s.head_dim)
    specs = [mb.TensorSpec((1, get_new_symbol()), dtype=types.int32),
             mb.TensorSpec((1, 1, get_new_symbol(), get_new_symbol()), dtype=types.fp16),
             mb.StateTensorSpec(cache, dtype=types.fp16), mb.StateTensorSpec(cache, dtype=types.fp16)]
    decoder = DecoderProgram(weights, arch, shape, rope)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def program(inputIds, causalMask, keyCache, valueCache):
        return decoder.build(inputIds, causalMask, keyCache, valueCache, progress_task)

    program.functions["main"].input_types = [
        ct.TensorType(name=INPUT_IDS, shape=ct.Shape((1, ct.RangeDim(1, ctx, default=1))), dtype=np.int32),
        ct.TensorType(name=CAUSAL_MASK, shape=ct.Shape((1, 1, ct.RangeDim(1, ctx, default=1), ct.RangeDim(1, ctx, default=1))),
                      dtype=np.float16),
    ]
    return program
