"""Phi3ForCausalLM: Phi-3-mini, Phi-3-medium, Phi-3.5-mini, Phi-4-mini.

Pre-norm decoder: RMSNorm -> fused qkv_proj -> attention with RoPE (GQA where
num_kv_heads < num_heads) -> o_proj, RMSNorm -> fused gate_up_proj -> SiLU(gate) * up
-> down_proj. RoPE is plain or LongRoPE (short/long factor lists, attention scaling),
optionally partial (Phi-4-mini rotates 0.75 of each head).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from phi3_export.arch.base import Architecture, ScalingGroup
from phi3_export.arch.registry import register
from phi3_export.checkpoint.config import rope_settings
from phi3_export.recipes.schema import ModelFacts


@register
class Phi3(Architecture):
    names = ("Phi3ForCausalLM",)

    layer_prefix = "model.layers.{i}."
    embed = "model.embed_tokens.weight"
    final_norm = "model.norm.weight"
    lm_head = "lm_head.weight"
    layer_norms: ClassVar[dict[str, str]] = {
        "input_layernorm": "model.layers.{i}.input_layernorm.weight",
        "post_attention_layernorm": "model.layers.{i}.post_attention_layernorm.weight",
    }
    layer_linears: ClassVar[dict[str, str]] = {
        "qkv_proj": "model.layers.{i}.self_attn.qkv_proj.weight",
        "o_proj": "model.layers.{i}.self_attn.o_proj.weight",
        "gate_up_proj": "model.layers.{i}.mlp.gate_up_proj.weight",
        "down_proj": "model.layers.{i}.mlp.down_proj.weight",
    }
    # Rows of the fused weights, in order: q|k|v and gate|up.
    fused: ClassVar[dict[str, tuple[str, ...]]] = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}
    scaling_groups = (
        ScalingGroup(prev="input_layernorm", linears=("qkv_proj",), inspect="self_attn"),
        ScalingGroup(prev="post_attention_layernorm", linears=("gate_up_proj",), inspect="mlp"),
        ScalingGroup(prev="gate_up_proj", prev_rows="up", linears=("down_proj",)),
        # V rows feed o_proj; under GQA one V channel feeds several heads' columns.
        ScalingGroup(prev="qkv_proj", prev_rows="v", linears=("o_proj",), kv_shared=True),
    )
    # Q and K rows are not clip-searched: their error shows in attention scores, not in the
    # linear's output the clip search scores (AutoAWQ's practice too); V rows are.
    no_clip: ClassVar[dict[str, tuple[str, ...]]] = {"qkv_proj": ("q", "k")}
    rope_kinds = ("default", "longrope")
    mlp_activation = "silu"

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        rope = rope_settings(config)
        sliding = config.get("sliding_window")
        return ModelFacts(
            architecture=config["architectures"][0],
            model_type=config.get("model_type", "phi3"),
            num_layers=config["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            context_length=config.get("max_position_embeddings", 4096),
            original_context_length=config.get("original_max_position_embeddings")
            or config.get("max_position_embeddings", 4096),
            rope={"kind": rope["kind"], "theta": rope["theta"], "partial_rotary_factor": rope["partial_rotary_factor"]},
            sliding_window="none" if sliding is None else sliding,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            tokenizer=tokenizer_kind,
        )

    @classmethod
    def part_sizes(cls, facts: ModelFacts) -> dict[str, int]:
        """Rows of each part of the fused projections, in ``fused`` order."""
        q, kv = facts.num_heads * facts.head_dim, facts.num_kv_heads * facts.head_dim
        return {"q": q, "k": kv, "v": kv, "gate": facts.intermediate_size, "up": facts.intermediate_size}

    @classmethod
    def weight_count(cls, facts: ModelFacts) -> int:
        h, parts = facts.hidden_size, cls.part_sizes(facts)
        attention = h * (parts["q"] + parts["k"] + parts["v"]) + parts["q"] * h
        mlp = h * (parts["gate"] + parts["up"]) + parts["up"] * h
        table = facts.vocab_size * h
        return facts.num_layers * (attention + mlp + 2 * h) + h + table * (1 if facts.tie_word_embeddings is True else 2)

    @classmethod
    def _hf_config(cls, config: dict[str, Any]):
        from transformers import Phi3Config

        hf = Phi3Config(**{k: v for k, v in config.items() if k != "phi3_export_fixture"})
        hf._attn_implementation = "eager"  # explicit mask below: same numbers on every machine
        return hf

    @classmethod
    def calibration_layer(cls, config: dict[str, Any], index: int):
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

        return Phi3DecoderLayer(cls._hf_config(config), index).eval()

    @classmethod
    def calibration_inputs(cls, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
        import torch
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        hf = cls._hf_config(config)
        positions = torch.arange(seq_len)[None, :]
        cos, sin = Phi3RotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
        query, key = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
        visible = key <= query
        if hf.sliding_window is not None:
            visible &= key > query - hf.sliding_window
        mask = torch.zeros(seq_len, seq_len).masked_fill(~visible, float("-inf"))[None, None]
        return {"position_embeddings": (cos, sin), "attention_mask": mask, "position_ids": positions}

    @classmethod
    def rope_tables(cls, config: dict[str, Any]) -> dict[str, Any]:
        rope = rope_settings(config)
        if rope["kind"] != "longrope":
            return {"short_factor": None, "long_factor": None, "attention_factor": 1.0}
        ctx = config.get("max_position_embeddings", 4096)
        orig = config.get("original_max_position_embeddings") or ctx
        factor = rope.get("attention_factor")
        if factor is None:
            # LongRoPE's published default: sqrt(1 + ln(scale) / ln(original context)).
            scale = ctx / orig
            factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        return {"short_factor": rope["short_factor"], "long_factor": rope["long_factor"], "attention_factor": factor}
