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
zeros). Activations are fp16; norms run in fp32, as transformers does, since squares of
Phi-3's residual stream overflow fp16. The blocks (norms, attention, MLP) are emitted by
blocks.py, by kind; this module holds what they share (weights, positions, rotary, cache).
"""

from __future__ import annotations

import numpy as np

from phi3_export.arch.plan import Attention, Decoder, Linear
from phi3_export.arch.rotary import rotary_tables
from phi3_export.checkpoint.stream import stream_layers
from phi3_export.export.coreml.blocks import BLOCKS, NORMS, lookup
from phi3_export.export.coreml.contract import CAUSAL_MASK, INPUT_IDS, LOGITS
from phi3_export.export.coreml.ct import coremltools
from phi3_export.export.coreml.weights import WeightStore

# Imported only when a Core ML export runs (artifact.py imports this module lazily).
ct = coremltools()
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types


class DecoderProgram:
    """Emits the decoder's ops into the current MIL builder context, walking the model plan.

    Each block is emitted by the function ``blocks.NORMS``/``blocks.BLOCKS`` hold for its kind.
    """

    def __init__(self, weights: WeightStore, decoder: Decoder, context_length: int):
        self.weights, self.decoder, self.ctx = weights, decoder, context_length
        self.tied_table = None

    # ---- weights ------------------------------------------------------------------------
    def weight(self, name: str, op_name: str, order: list[int] | None = None):
        """A [rows, cols] weight: int blockwise constexpr if quantized, fp16 const otherwise; rows in ``order``."""
        if self.weights.qckpt.is_quantized(name):
            bw = self.weights.blockwise(name, order)
            return mb.constexpr_blockwise_shift_scale(data=bw.data, scale=bw.scale, offset=bw.offset, name=op_name)
        return mb.const(val=self.weights.float16(name, order), name=op_name)

    def linear(self, x, linear: Linear, op_name: str):
        """A fused linear's rows (and bias) in parts order, so its output splits into parts by size."""
        order = linear.row_order()
        if linear.bias:  # the bias constant first: op order is the package's byte order
            bias = mb.const(val=self.weights.float16(linear.bias, order), name=f"{op_name}_bias")
            return mb.linear(x=x, weight=self.weight(linear.weight, f"{op_name}_weight", order), bias=bias, name=op_name)
        return mb.linear(x=x, weight=self.weight(linear.weight, f"{op_name}_weight", order), name=op_name)

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
        window = self.decoder.layers[0].attention.sliding_window
        if window and window < self.ctx:
            allowed = mb.logical_and(x=allowed, y=mb.less(x=dist, y=np.int32(window)), name="causal_window")
        bias = mb.select(cond=allowed, a=np.float16(0), b=np.float16(-np.inf), name="bias")
        bias = mb.expand_dims(x=bias, axes=[0, 1], name="bias_4d")
        return mb.add(x=bias, y=mask, name="attention_bias"), keys

    def rotary_tables(self, pos, end):
        rotary = self.decoder.rotary
        dim, tables = rotary.dim, rotary_tables(rotary, self.ctx)

        def rows(kind: str):
            suffix = f"_{kind}" if kind else ""
            return [mb.reshape(x=mb.gather(x=table.astype(np.float16), indices=pos, axis=0), shape=[1, 1, -1, dim // 2],
                               name=f"rope_{part}{suffix}") for part, table in zip(("cos", "sin"), tables[kind])]

        if not rotary.longrope:
            return rows("")
        short, long = rows("short"), rows("long")
        # transformers switches every position to the long factors once the sequence
        # outgrows the original context (the ONNX export's Where does the same).
        use_long = mb.greater(x=end, y=np.int32(rotary.original_context), name="rope_use_long")
        return [mb.select(cond=use_long, a=lo, b=sh, name=f"rope_{part}") for part, sh, lo in zip(("cos", "sin"), short, long)]

    def rotate(self, x, heads: int, cos, sin, op_name: str):
        """Rotary on the first rotary dims of each head (halves, not interleaved)."""
        rot, hd = self.decoder.rotary.dim, self.decoder.head_dim
        half = rot // 2

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
        x = mb.reshape(x=x, shape=[1, -1, heads, self.decoder.head_dim], name=f"{op_name}_split_heads")
        return mb.transpose(x=x, perm=[0, 2, 1, 3], name=op_name)

    def cache_update(self, state, new, i: int, past, end, op_name: str):
        """Write ``new`` [1, kv, q, hd] at positions past..end of layer i; return [1, kv, end, hd] of it."""
        kv, hd = self.decoder.kv_heads, self.decoder.head_dim
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

    def expand_kv(self, x, attn: Attention, op_name: str):
        """GQA: repeat each KV head for the query heads that read it (transformers' repeat_kv order)."""
        rep = attn.heads // attn.kv_heads
        if rep == 1:
            return x
        x = mb.reshape(x=x, shape=[1, attn.kv_heads, 1, -1, attn.head_dim], name=f"{op_name}_5d")
        x = mb.tile(x=x, reps=[1, 1, rep, 1, 1], name=f"{op_name}_tile")
        return mb.reshape(x=x, shape=[1, attn.heads, -1, attn.head_dim], name=op_name)

    def layer(self, layer, residual, shared: dict):
        p = f"layers_{layer.index}"
        h = lookup(NORMS, layer.attn_norm.kind)(self, residual, layer.attn_norm, f"{p}_{layer.attn_norm.module}")
        attn = lookup(BLOCKS, layer.attention.kind)(self, layer.attention, h, layer.index, shared)
        residual = mb.add(x=residual, y=attn, name=f"{p}_attn_residual")
        h = lookup(NORMS, layer.mlp_norm.kind)(self, residual, layer.mlp_norm, f"{p}_{layer.mlp_norm.module}")
        return mb.add(x=residual, y=lookup(BLOCKS, layer.mlp.kind)(self, layer.mlp, h, layer.index, shared),
                      name=f"{p}_mlp_residual")

    def embedding(self, ids):
        table = self.weight(self.decoder.embedding, "embed_tokens_weight")
        if self.decoder.tied:
            self.tied_table = table  # one constant: the LM head reads the same codes
        scale = self.decoder.embedding_scale
        if scale == 1.0:
            return mb.gather(x=table, indices=ids, axis=0, name="embed_tokens")
        rows = mb.gather(x=table, indices=ids, axis=0, name="embed_tokens_rows")
        return mb.mul(x=rows, y=np.float16(scale), name="embed_tokens")  # muP (Phi-3-small: x 10)

    def lm_head(self, x):
        """fp32 logits; the plan's logits scale (muP) and masked ids applied in fp32, after the cast.

        A masked id's logit is float32's lowest, set (select), not added: the value the reference
        writes. It is an fp32 op on an fp32 tensor, so Core ML keeps it in fp32 (the ANE has no
        fp32; a compute unit that runs fp16 only hands such an op to the CPU).
        """
        d = self.decoder
        if d.tied:
            logits = mb.linear(x=x, weight=self.tied_table, name="lm_head")
        else:
            logits = self.linear(x, d.lm_head, "lm_head")
        steps = [name for name, wanted in (("logits_scaled", d.logits_scale != 1.0), ("logits_masked", bool(d.masked_ids))) if wanted]
        names = ["lm_head_fp32", *steps[:-1], LOGITS] if steps else [LOGITS]
        logits = mb.cast(x=logits, dtype="fp32", name=names[0])
        if d.logits_scale != 1.0:
            logits = mb.mul(x=logits, y=np.float32(d.logits_scale), name=names[1])
        if d.masked_ids:
            masked = np.zeros(d.vocab, np.bool_)
            masked[list(d.masked_ids)] = True
            logits = mb.select(cond=masked, a=np.float32(np.finfo(np.float32).min), b=logits, name=LOGITS)
        return logits

    def build(self, ids, mask, key_cache, value_cache, progress_task=None):
        past, end, pos = self.positions(ids, mask)
        bias, keys = self.attention_bias(mask, pos, end)
        cos, sin = self.rotary_tables(pos, end)
        shared = {"past": past, "end": end, "cos": cos, "sin": sin, "bias": bias, "states": (key_cache, value_cache),
                  "positions": pos, "key_positions": keys}
        x = self.embedding(ids)
        # Each layer's codes live in the scratch files once emitted: unmap its quantized file after it.
        for layer in stream_layers(self.weights.qckpt, self.decoder.layers, progress_task):
            x = self.layer(layer, x, shared)
        final = self.decoder.final_norm
        return self.lm_head(lookup(NORMS, final.kind)(self, x, final, "norm"))


def build_program(weights: WeightStore, decoder: Decoder, ctx: int, progress_task=None):
    cache = (len(decoder.layers), 1, decoder.kv_heads, ctx, decoder.head_dim)
    specs = [mb.TensorSpec((1, get_new_symbol()), dtype=types.int32),
             mb.TensorSpec((1, 1, get_new_symbol(), get_new_symbol()), dtype=types.fp16),
             mb.StateTensorSpec(cache, dtype=types.fp16), mb.StateTensorSpec(cache, dtype=types.fp16)]
    program_builder = DecoderProgram(weights, decoder, ctx)

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def program(inputIds, causalMask, keyCache, valueCache):
        return program_builder.build(inputIds, causalMask, keyCache, valueCache, progress_task)

    program.functions["main"].input_types = [
        ct.TensorType(name=INPUT_IDS, shape=ct.Shape((1, ct.RangeDim(1, ctx, default=1))), dtype=np.int32),
        ct.TensorType(name=CAUSAL_MASK, shape=ct.Shape((1, 1, ct.RangeDim(1, ctx, default=1), ct.RangeDim(1, ctx, default=1))),
                      dtype=np.float16),
    ]
    return program
