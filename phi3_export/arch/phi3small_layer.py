"""Phi-3-small (``Phi3SmallForCausalLM``) in plain float32 torch: one decoder layer, and the whole model.

The published model is remote code that needs triton and flash-attn; this module reproduces
what it computes, written from its definition (nothing of it is imported or executed). AWQ
calibration hooks every ``nn.Linear`` of a layer, and validation streams the reference through
the layers one at a time; submodules are named as the published checkpoint's tensors minus
``model.layers.{i}.``, so a layer loads with ``load_state_dict`` from those names.
``Phi3SmallModel`` is the whole model (published state-dict names), used to train the fixture
and as the tests' reference.

What the published model computes:

- Pre-norm residual layer: ``h = x + attn(ln1(x))``, ``out = h + mlp(ln2(h))``, with
  ``nn.LayerNorm`` (weight and bias, eps ``layer_norm_epsilon``) as ``input_layernorm`` and
  ``post_attention_layernorm``. Every linear has a bias.
- Attention: ``head_dim = hidden_size // num_attention_heads``; one fused
  ``self_attn.query_key_value`` in head-group-major order: its output viewed as
  ``[.., kv_heads, heads / kv_heads + 2, head_dim]`` holds, per KV group, that group's query
  heads, then its key, then its value (query head ``g * rep + j`` reads KV head ``g``).
  RoPE rotates halves (``x cos + rotate_half(x) sin``) with base ``rope_embedding_base`` (not
  ``rope_theta``) at positions times ``rope_position_scale``. The softmax scale is
  ``mup_attn_multiplier / head_dim`` under ``mup_use_scaling`` (default), else
  ``1 / sqrt(head_dim)``. The output projection is ``self_attn.dense``.
- Layers ``i`` with ``(i + 1) % dense_attention_every_n_layers == 0`` attend densely (causal);
  the others are blocksparse: causal within the per-head block pattern of arch/blocksparse.py
  (local blocks plus vertical stripes offset per head).
- MLP (GEGLU): ``up = mlp.up_proj(x)`` (width ``2 * ff_intermediate_size``); the gate is the
  even columns, the linear part the odd ones. With ``gegelu_limit`` the gate is clamped to
  ``<= limit`` and the linear part to ``[-limit, limit]``, infinities passing through
  unclamped; ``out = mlp.down_proj(quick_gelu(gate) * (linear + 1))`` with
  ``quick_gelu(x) = x * sigmoid(1.702 x)``.
- Model: ``model.embed_tokens`` times ``mup_embedding_multiplier`` (when > 0), the layers,
  ``model.final_layernorm`` (LayerNorm with bias), ``lm_head`` (no bias; the embedding table
  unless ``tie_word_embeddings`` is false), logits in float32 divided by
  ``mup_width_multiplier``, and the dummy vocabulary ids set to float32's lowest value.
- 128k (``rope_scaling`` type "su"/"longrope", see :func:`rotary_embedding`): once the total
  sequence outgrows ``original_max_position_embeddings``, every position uses the long
  factors; cos/sin are multiplied by ``long_mscale`` when positive, else by
  sqrt(1 + ln(max_position_embeddings / original) / ln(original)); on the short factors by
  ``short_mscale`` when positive, else 1.0 (Phi-3-mini's LongRoPE scales both).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from phi3_export.arch.phi3small import _dims, attention_scale, blocksparse_of, is_dense_layer, masked_ids, tied
from phi3_export.checkpoint.config import rope_settings

PUBLISHED_ROPE_BASE = 1e6  # Phi3SmallConfig's default rope_embedding_base
SCORE_ELEMENTS = 1 << 22  # attention scores held at once (16 MB fp32): queries are processed in chunks


def rotary_embedding(config: dict[str, Any], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, seq, head_dim] (halves repeated) for ``positions`` [batch, seq] or [seq].

    The total sequence length is ``max(positions) + 1``: it picks LongRoPE's factors for every
    position at once (module docstring).
    """
    rope = rope_settings(config)
    positions = positions if positions.dim() == 2 else positions[None]
    dim = config["hidden_size"] // config["num_attention_heads"]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = float(config.get("rope_embedding_base") or PUBLISHED_ROPE_BASE)  # never rope_theta
    if rope["kind"] == "default":
        inv_freq, mscale = 1.0 / (base**exponent), 1.0
    elif rope["kind"] == "longrope":
        ctx = config.get("max_position_embeddings") or 8192
        original = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") or ctx
        long = int(positions.max()) + 1 > original
        factors = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float32)
        inv_freq = 1.0 / (factors * base**exponent)
        mscale = rope["long_mscale" if long else "short_mscale"] or -1
        if mscale <= 0:
            ratio = ctx / original
            mscale = math.sqrt(1 + math.log(ratio) / math.log(original)) if long and ratio > 1 else 1.0
    else:
        raise ValueError(f"rope kind {rope['kind']!r} is not part of Phi-3-small")
    scale = float(config.get("rope_position_scale") or 1.0)
    freqs = (positions.float() * scale)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * float(mscale), emb.sin() * float(mscale)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gegelu(up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """GEGLU on the up projection's output: even columns gate, odd columns linear (module docstring)."""
    gate, linear = up[..., ::2], up[..., 1::2]
    if limit is not None:
        gate = torch.where(torch.isinf(gate), gate, gate.clamp(max=limit))
        linear = torch.where(torch.isinf(linear), linear, linear.clamp(min=-limit, max=limit))
    return quick_gelu(gate) * (linear + 1)


class Phi3SmallAttention(nn.Module):
    def __init__(self, config: dict[str, Any], index: int):
        super().__init__()
        d = _dims(config)
        self.heads, self.kv_heads, self.head_dim = d["heads"], d["kv_heads"], d["head_dim"]
        self.rep = self.heads // self.kv_heads
        self.scale = attention_scale(config, self.head_dim)
        self.blocksparse = None if is_dense_layer(config, index) else blocksparse_of(config)
        self.query_key_value = nn.Linear(d["hidden"], (self.heads + 2 * self.kv_heads) * self.head_dim)
        self.dense = nn.Linear(self.heads * self.head_dim, d["hidden"])

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[b, s, rows] -> q [b, heads, s, hd], k and v [b, kv_heads, s, hd] (head-group-major rows)."""
        b, s, _ = qkv.shape
        groups = qkv.view(b, s, self.kv_heads, self.rep + 2, self.head_dim)
        q = groups[..., : self.rep, :].reshape(b, s, self.heads, self.head_dim)
        return q.transpose(1, 2), groups[..., -2, :].transpose(1, 2), groups[..., -1, :].transpose(1, 2)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: additive [1 or b, 1, s, s] or None; attention is causal either way (the
        mask can only hide more), and a blocksparse layer adds its pattern (queries and keys at
        positions 0..s-1). Keyword names as transformers' attention takes them."""
        b, s, _ = x.shape
        cos, sin = (t[:, None] for t in position_embeddings)
        q, k, v = self.split_qkv(self.query_key_value(x))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rows = max(1, SCORE_ELEMENTS // (b * self.heads * s))
        out = []
        for start in range(0, s, rows):
            stop = min(s, start + rows)  # causal: keys past the chunk's last query are never seen
            queries = np.arange(start, stop)
            if self.blocksparse is not None:
                visible = torch.from_numpy(self.blocksparse.token_mask(self.heads, queries, stop))  # [heads, n, stop]
            else:
                visible = torch.from_numpy(np.arange(stop)[None, :] <= queries[:, None])
            mask = visible
            if attention_mask is not None:
                mask = attention_mask[..., start:stop, :stop].masked_fill(~visible, float("-inf"))
            # softmax(q.k * scale + mask) v, GQA: query head h reads KV head h // rep.
            out.append(nn.functional.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], attn_mask=mask, scale=self.scale, enable_gqa=True))
        attn = torch.cat(out, dim=-2)
        return self.dense(attn.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class Phi3SmallMlp(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        d = _dims(config)
        limit = config.get("gegelu_limit")
        self.limit = None if limit is None else float(limit)
        self.up_proj = nn.Linear(d["hidden"], 2 * d["inter"])
        self.down_proj = nn.Linear(d["inter"], d["hidden"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gegelu(self.up_proj(x), self.limit))


class Phi3SmallLayer(nn.Module):
    """One decoder layer; ``forward(hidden [b, s, h], position_embeddings=(cos, sin),
    attention_mask=additive [1 or b, 1, s, s] or None) -> hidden [b, s, h]``."""

    def __init__(self, config: dict[str, Any], index: int):
        super().__init__()
        d = _dims(config)
        self.input_layernorm = nn.LayerNorm(d["hidden"], eps=d["eps"])
        self.self_attn = Phi3SmallAttention(config, index)
        self.post_attention_layernorm = nn.LayerNorm(d["hidden"], eps=d["eps"])
        self.mlp = Phi3SmallMlp(config)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` is unused (RoPE arrives as ``position_embeddings``); accepted as transformers' layers accept it."""
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Body(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        d = _dims(config)
        self.embed_tokens = nn.Embedding(config["vocab_size"], d["hidden"])
        self.layers = nn.ModuleList(Phi3SmallLayer(config, i) for i in range(config["num_hidden_layers"]))
        self.final_layernorm = nn.LayerNorm(d["hidden"], eps=d["eps"])


class Phi3SmallModel(nn.Module):
    """The whole published forward: ``forward(input_ids [b, s]) -> float32 logits [b, s, vocab]``.

    State-dict keys are the published tensor names (``lm_head.weight`` only when untied). No KV
    cache: the logits of step t are those of a prefill of the first t + 1 tokens.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = None if tied(config) else nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        embedding = config.get("mup_embedding_multiplier")
        self.embedding_multiplier = float(embedding) if embedding and embedding > 0 else None
        width = config.get("mup_width_multiplier")
        self.width_multiplier = float(width) if width else None
        dummy = torch.zeros(config["vocab_size"], dtype=torch.bool)
        dummy[list(masked_ids(config))] = True
        self.register_buffer("dummy_mask", dummy, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:
            x = x * self.embedding_multiplier
        position_embeddings = rotary_embedding(self.config, torch.arange(input_ids.shape[1])[None])
        for layer in self.model.layers:
            x = layer(x, position_embeddings)
        x = self.model.final_layernorm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = nn.functional.linear(x, head).float()
        if self.width_multiplier is not None:
            logits = logits / self.width_multiplier
        return logits.masked_fill(self.dummy_mask, torch.finfo(torch.float32).min)
