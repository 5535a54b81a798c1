"""The decoder as a torch module for coreai-torch to convert, built by walking the model plan.

One module serves both functions of the asset (contract.py): torch.export traces it once
with a prefill chunk and once with one token; static shapes throughout. The KV cache is two
arguments written in place (coreai-torch makes a mutated argument a state). Positions come
from the ``position`` input, so causality, the sliding window and the LongRoPE switch are
computed inside: the caller passes no mask.

Compute dtype: float16 (what a device runs) or float32 (a parity check). Weights come from
``WeightSource`` (int blockwise codes with float16 scales, dequantized by the op, then cast
to the compute dtype); RMSNorm reduces in float32 as transformers does (squares of Phi-3's
residual stream overflow float16); logits are float32.

Each block is computed by the function ``NORMS``/``BLOCKS`` hold for its kind, as in the
ONNX emitter and the Core ML program; a kind missing here is refused with its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phi3_export.arch.plan import Attention, Decoder, Linear, Mlp, Norm
from phi3_export.arch.rotary import rotary_tables
from phi3_export.errors import Phi3ExportError
from phi3_export.export.coreai.weights import WeightSource


def _key(name: str) -> str:
    """A checkpoint tensor name as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


@dataclass
class Step:
    """What every layer of one forward shares."""

    positions: torch.Tensor  # [q] int64
    bias: torch.Tensor  # [1, 1, q, context] additive
    cos: torch.Tensor  # [q, rotary_dim / 2]
    sin: torch.Tensor
    key_cache: torch.Tensor  # [layers, 1, kv_heads, context, head_dim], written in place
    value_cache: torch.Tensor


class DecoderModule(torch.nn.Module):
    def __init__(self, decoder: Decoder, source: WeightSource, context_length: int):
        super().__init__()
        self.decoder, self.ctx, self.dtype = decoder, context_length, source.dtype
        self.weights = torch.nn.ModuleDict()
        names = [decoder.embedding, decoder.final_norm.weight] + ([] if decoder.tied else [decoder.lm_head.weight])
        for layer in decoder.layers:
            names += list(layer.tensors())
        for name in dict.fromkeys(names):
            self.weights[_key(name)] = source.module(name, f"weights.{_key(name)}")
        tables = rotary_tables(decoder.rotary, context_length)
        for kind, (cos, sin) in tables.items():
            self.register_buffer(f"cos_{kind or 'plain'}", torch.from_numpy(cos).to(self.dtype))
            self.register_buffer(f"sin_{kind or 'plain'}", torch.from_numpy(sin).to(self.dtype))

    # ---- weights -----------------------------------------------------------------------------
    def weight(self, name: str) -> torch.Tensor:
        return self.weights[_key(name)]().to(self.dtype)

    def linear(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return F.linear(x, self.weight(linear.weight), self.weight(linear.bias) if linear.bias else None)

    def rms_norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
        return normed.to(self.dtype) * self.weight(norm.weight)

    # ---- positions -----------------------------------------------------------------------------
    def step(self, q_len: int, position: torch.Tensor, key_cache, value_cache) -> Step:
        positions = position.long() + torch.arange(q_len)
        keys = torch.arange(self.ctx)
        distance = positions[:, None] - keys[None, :]
        allowed = distance >= 0
        window = self.decoder.layers[0].attention.sliding_window
        if window and window < self.ctx:
            allowed = allowed & (distance < window)
        bias = torch.where(allowed, 0.0, torch.finfo(self.dtype).min).to(self.dtype)[None, None]
        rotary = self.decoder.rotary
        if rotary.longrope:
            # transformers switches every position to the long factors once the sequence
            # outgrows the original context (the ONNX graph and the Core ML program do the same).
            use_long = (position.long() + q_len) > rotary.original_context
            cos = torch.where(use_long, self.cos_long[positions], self.cos_short[positions])
            sin = torch.where(use_long, self.sin_long[positions], self.sin_short[positions])
        else:
            cos, sin = self.cos_plain[positions], self.sin_plain[positions]
        return Step(positions, bias, cos, sin, key_cache, value_cache)

    def rotate(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """RoPE on the first rotary dims of each head (halves, not interleaved); x is [1, heads, q, head_dim]."""
        rot = self.decoder.rotary.dim
        half = rot // 2
        x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
        return torch.cat([x1 * step.cos - x2 * step.sin, x2 * step.cos + x1 * step.sin, rest], dim=-1)

    # ---- blocks ------------------------------------------------------------------------------------
    def dense_attention(self, attn: Attention, h: torch.Tensor, index: int, step: Step) -> torch.Tensor:
        q_len = h.shape[1]
        if attn.qkv is not None:
            q, k, v = self.linear(h, attn.qkv).split(attn.qkv.part_sizes(), dim=-1)
        else:
            q, k, v = (self.linear(h, lin) for lin in (attn.q, attn.k, attn.v))

        def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
            return x.view(1, q_len, heads, attn.head_dim).transpose(1, 2)

        q = self.rotate(heads_first(q, attn.heads), step)
        k = self.rotate(heads_first(k, attn.kv_heads), step)
        v = heads_first(v, attn.kv_heads)
        step.key_cache[index, 0].index_copy_(1, step.positions, k[0])
        step.value_cache[index, 0].index_copy_(1, step.positions, v[0])
        rep = attn.heads // attn.kv_heads

        def expanded(cache: torch.Tensor) -> torch.Tensor:
            # GQA: each KV head read by `rep` query heads (transformers' repeat_kv order)
            layer = cache[index]
            if rep == 1:
                return layer
            return layer[:, :, None].expand(1, attn.kv_heads, rep, self.ctx, attn.head_dim).reshape(1, attn.heads, self.ctx, attn.head_dim)

        out = F.scaled_dot_product_attention(q, expanded(step.key_cache), expanded(step.value_cache),
                                             attn_mask=step.bias, scale=attn.scale)
        return self.linear(out.transpose(1, 2).reshape(1, q_len, attn.heads * attn.head_dim), attn.o)

    def swiglu_mlp(self, mlp: Mlp, h: torch.Tensor, _index: int, _step: Step) -> torch.Tensor:
        gate, up = self.linear(h, mlp.gate_up).split(mlp.gate_up.part_sizes(), dim=-1)
        return self.linear(F.silu(gate) * up, mlp.down)

    # ---- the decoder ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor) -> torch.Tensor:
        step = self.step(input_ids.shape[1], position, key_cache, value_cache)
        table = self.weight(self.decoder.embedding)
        x = F.embedding(input_ids.long(), table)
        for layer in self.decoder.layers:
            h = _lookup(NORMS, layer.attn_norm.kind)(self, x, layer.attn_norm)
            x = x + _lookup(BLOCKS, layer.attention.kind)(self, layer.attention, h, layer.index, step)
            h = _lookup(NORMS, layer.mlp_norm.kind)(self, x, layer.mlp_norm)
            x = x + _lookup(BLOCKS, layer.mlp.kind)(self, layer.mlp, h, layer.index, step)
        final = self.decoder.final_norm
        x = _lookup(NORMS, final.kind)(self, x, final)
        # A tied LM head reads the table's one dequantization (one constant, one op).
        head = table if self.decoder.tied else self.weight(self.decoder.lm_head.weight)
        return F.linear(x, head).float()


NORMS: dict[str, Callable] = {"rms": DecoderModule.rms_norm}
BLOCKS: dict[str, Callable] = {"dense": DecoderModule.dense_attention, "swiglu": DecoderModule.swiglu_mlp}


def _lookup(table: dict[str, Callable], kind: str) -> Callable:
    try:
        return table[kind]
    except KeyError:
        raise Phi3ExportError(f"Core AI export: block kind {kind!r} is not supported yet") from None


def check_supported(decoder: Decoder) -> None:
    """Every block kind of the plan has a function here (checked before anything is quantized)."""
    for layer in decoder.layers:
        for norm in (layer.attn_norm, layer.mlp_norm):
            _lookup(NORMS, norm.kind)
        _lookup(BLOCKS, layer.attention.kind)
        _lookup(BLOCKS, layer.mlp.kind)
    _lookup(NORMS, decoder.final_norm.kind)
