"""One Phi-3.5-MoE (``PhiMoEForCausalLM``) decoder layer in plain float32 torch.

AWQ calibration hooks every ``nn.Linear`` of this module to capture its input, and
validation streams the reference model through it one layer at a time. Its submodules are
named as the published checkpoint's tensors minus ``model.layers.{i}.``, so a layer loads
with ``load_state_dict`` from those names.

What the published model computes (and what this module reproduces):

- Pre-norm residual layer with *LayerNorm* (weight and bias; the config's ``rms_norm_eps``
  is its eps), not RMSNorm.
- Attention: separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, each with a bias
  when ``attention_bias``; RoPE by rotating halves of each head; grouped-query attention
  (each KV head serves ``heads / kv_heads`` query heads); softmax(q·kᵀ / √head_dim + mask)·v.
- Mixture of experts: the router ``block_sparse_moe.gate`` (no bias) scores every expert;
  "sparsemixer" routing picks two experts per token (see :func:`sparsemixer_top2`); each
  expert is a SiLU-gated MLP, ``w2(silu(w1 x) · w3 x)``; the token's output is the sum of its
  two experts' outputs, each scaled by its routing weight. An expert runs only on the tokens
  routed to it, so a hook on an expert's linear sees exactly those tokens.
- RoPE is LongRoPE (see :func:`rotary_embedding`): per-frequency divisors ``short_factor``
  while the sequence fits the original context, ``long_factor`` past it, and cos/sin scaled
  by the config's own ``short_mscale`` / ``long_mscale`` (1.243… in the published config)
  rather than the multiplier derived from the context ratio.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from phi3_export.checkpoint.config import rope_settings


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings with the original context and the "factor" resolved (either config layout)."""
    rope = rope_settings(config)
    raw = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    ctx = config.get("max_position_embeddings", 4096)
    rope["original_context"] = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") or ctx
    rope["factor"] = raw.get("factor") or ctx / rope["original_context"]
    return rope


def rotary_embedding(config: dict[str, Any], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [batch, seq, head_dim] (halves repeated) for ``positions`` [batch, seq] or [seq].

    The sequence length is ``max(positions) + 1``. For LongRoPE, past the original context the
    frequencies are divided by ``long_factor`` and cos/sin scaled by ``long_mscale``, otherwise
    by ``short_factor`` / ``short_mscale``. Without the mscale keys the multiplier is the
    config's ``attention_factor``, else sqrt(1 + ln(factor) / ln(original context)).
    ``config`` is a config.json dict: published ``rope_scaling`` + ``rope_theta`` or
    transformers' ``rope_parameters``; "su" is read as "longrope".

    transformers 5.23's PhimoeRotaryEmbedding differs past the original context: it switches
    to ``long_mscale`` but keeps the short factors. The published modelling code (and this
    function) switch both.
    """
    rope = _rope(config)
    if rope["partial_rotary_factor"] != 1.0:
        raise ValueError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not part of PhiMoE")
    positions = positions if positions.dim() == 2 else positions[None]
    dim = _head_dim(config)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    seq_len = int(positions.max()) + 1
    if rope["kind"] == "longrope":
        long = seq_len > rope["original_context"]
        factors = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float32)
        inv_freq = 1.0 / (factors * rope["theta"] ** exponent)
        mscale = rope["long_mscale" if long else "short_mscale"]
        if mscale is None:
            mscale = rope["attention_factor"]
        if mscale is None:
            factor, orig = rope["factor"], rope["original_context"]
            mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    elif rope["kind"] == "default":
        inv_freq, mscale = 1.0 / (rope["theta"] ** exponent), 1.0
    else:
        raise ValueError(f"rope kind {rope['kind']!r} is not part of PhiMoE")
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * float(mscale), emb.sin() * float(mscale)


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-time sparsemixer: (weights [tokens, 2], experts [tokens, 2]) from router logits.

    The first expert is the arg-max. Its weight is a softmax over the experts whose logit is
    close to the maximum: ``(max - s) / max(|s|, max) <= 2 * jitter_eps``; the others are
    masked out. The second expert is the arg-max once the first is masked out, and its weight
    the same softmax over the experts close to that second maximum (the first stays masked).
    The weights are not renormalised to sum to 1.
    """
    weights, experts, scores = [], [], logits
    for _ in range(2):
        best, index = scores.max(dim=-1, keepdim=True)
        far = ((best - logits) / logits.abs().clamp(min=best)) > 2 * jitter_eps
        gates = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, index))
        experts.append(index)
        scores = torch.scatter(scores, -1, index, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(experts, dim=-1)


class PhiMoEAttention(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        hidden, self.heads = config["hidden_size"], config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = _head_dim(config)
        bias = bool(config.get("attention_bias", False))
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Keyword names as transformers' attention modules take them (AWQ scores this module by name)."""
        cos, sin = position_embeddings
        mask = attention_mask
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + self._rotate_half(q) * sin
        k = k * cos + self._rotate_half(k) * sin
        group = self.heads // self.kv_heads  # repeat_kv: query head h reads KV head h // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
        if mask is not None:
            scores = scores + mask
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class PhiMoEExpert(nn.Module):
    """SiLU-gated MLP: ``w2(silu(w1 x) * w3 x)`` (w1 gate, w3 up, w2 down), no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class PhiMoESparseBlock(nn.Module):
    """Router ``gate`` + ``experts``; each expert runs only on the tokens routed to it."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        hidden, experts = config["hidden_size"], config["num_local_experts"]
        if config.get("num_experts_per_tok", 2) != 2:
            raise ValueError(f"sparsemixer routing picks 2 experts, config asks {config['num_experts_per_tok']}")
        self.jitter_eps = float(config.get("router_jitter_noise", 0.01))
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(PhiMoEExpert(hidden, config["intermediate_size"]) for _ in range(experts))

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each [tokens, 2]."""
        return sparsemixer_top2(logits, self.jitter_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.routing(self.gate(x))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class PhiMoELayer(nn.Module):
    """One decoder layer; ``forward(hidden [b, s, h], position_embeddings=(cos, sin),
    attention_mask=additive [1 or b, 1, s, s_kv] or None) -> hidden [b, s, h]``."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        hidden, eps = config["hidden_size"], float(config.get("rms_norm_eps", 1e-5))
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = PhiMoEAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.block_sparse_moe = PhiMoESparseBlock(config)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` is unused (RoPE arrives as ``position_embeddings``); accepted as transformers' layers accept it."""
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))
