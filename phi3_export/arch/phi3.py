"""Phi3ForCausalLM: Phi-3-mini, Phi-3-medium, Phi-3.5-mini, Phi-4-mini.

Pre-norm decoder: RMSNorm -> fused qkv_proj -> attention with RoPE (GQA where
num_kv_heads < num_heads) -> o_proj, RMSNorm -> fused gate_up_proj -> SiLU(gate) * up
-> down_proj. RoPE is plain or LongRoPE (short/long factor lists, attention scaling),
optionally partial (Phi-4-mini rotates 0.75 of each head).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from phi3_export.arch.base import Architecture, causal_mask
from phi3_export.arch.plan import (
    Attention,
    Decoder,
    DecoderLayer,
    Linear,
    Mlp,
    ModelPlan,
    Norm,
    Rotary,
    Rows,
    ScalingGroup,
)
from phi3_export.arch.registry import register
from phi3_export.checkpoint.config import rope_settings
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.loader import clean_message
from phi3_export.recipes.schema import ModelFacts


def longrope_attention_factor(config: dict[str, Any], rope: dict[str, Any]) -> float:
    """LongRoPE's cos/sin multiplier: the config's, else sqrt(1 + ln(scale) / ln(original context))."""
    if rope["kind"] != "longrope":
        return 1.0
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    ctx = config.get("max_position_embeddings") or 4096
    orig = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or ctx
    scale = ctx / orig
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))


def rms_norm_eps(config: dict[str, Any]) -> float:
    eps = config.get("rms_norm_eps")
    return 1e-5 if eps is None else float(eps)


def model_facts(**facts: Any) -> ModelFacts:
    """ModelFacts from config.json values (``check_config`` has range-checked them already)."""
    try:
        return ModelFacts(**facts)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if field == "tokenizer":
            raise Phi3ExportError("checkpoint has no usable tokenizer (tokenizer.json, or tokenizer.model for a "
                                  "sentencepiece-style one)") from None
        raise Phi3ExportError(f"config.json: {field}: {clean_message(err['msg'])}") from None


def rotary_of(config: dict[str, Any], head_dim: int, scales: tuple[float, float] | None = None) -> Rotary:
    """The plan's Rotary from config.json (plain or LongRoPE, partial rotary)."""
    rope = rope_settings(config)
    ctx = config.get("max_position_embeddings") or 4096
    orig = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or ctx
    dim = int(head_dim * rope["partial_rotary_factor"])
    if rope["kind"] != "longrope":
        return Rotary(dim=dim, theta=rope["theta"], original_context=orig)
    factor = longrope_attention_factor(config, rope)
    short_scale, long_scale = scales or (factor, factor)
    return Rotary(dim=dim, theta=rope["theta"], original_context=orig, short_factor=tuple(rope["short_factor"]),
                  long_factor=tuple(rope["long_factor"]), short_scale=short_scale, long_scale=long_scale)


def hf_phi3_keys(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers 5's Phi3Config takes it: RoPE as ``rope_parameters``.

    Published Phi-3 128k files (and Phi-3-vision's) spell LongRoPE ``rope_scaling: {type: su, ...}``
    with ``original_max_position_embeddings`` at the top level, which Phi3Config refuses; the
    keys of other parts (the image embedding's blocks, our fixture record) are not its business.
    """
    skip = {"phi3_export_fixture", "embd_layer", "img_processor", "auto_map"}
    keys = {k: v for k, v in config.items() if k not in skip}
    if config.get("rope_parameters") is not None:  # already transformers 5's layout
        return keys
    rope = rope_settings(config)
    params: dict[str, Any] = {"rope_type": rope["kind"], "rope_theta": rope["theta"],
                              "partial_rotary_factor": rope["partial_rotary_factor"]}
    if rope["kind"] == "longrope":
        ctx = config.get("max_position_embeddings") or 4096
        params |= {"short_factor": rope["short_factor"], "long_factor": rope["long_factor"],
                   "original_max_position_embeddings": config.get("original_max_position_embeddings")
                   or rope.get("original_max_position_embeddings") or ctx}
        if rope.get("attention_factor") is not None:
            params["attention_factor"] = rope["attention_factor"]
    keys.pop("rope_scaling", None)
    keys.pop("rope_theta", None)
    return {**keys, "rope_parameters": params}


@register
class Phi3(Architecture):
    names = ("Phi3ForCausalLM",)

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        rope = rope_settings(config)
        sliding = config.get("sliding_window")
        ctx = config.get("max_position_embeddings") or 4096
        return model_facts(
            architecture=config["architectures"][0],
            model_type=config.get("model_type") or "phi3",
            num_layers=config["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            context_length=ctx,
            original_context_length=config.get("original_max_position_embeddings") or ctx,
            rope={"kind": rope["kind"], "theta": rope["theta"], "partial_rotary_factor": rope["partial_rotary_factor"]},
            sliding_window="none" if sliding is None else sliding,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            tokenizer=tokenizer_kind,
        )

    @classmethod
    def layer(cls, config: dict[str, Any], i: int) -> DecoderLayer:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        inter, eps = config["intermediate_size"], rms_norm_eps(config)
        q, kv = heads * head_dim, kv_heads * head_dim
        p = f"model.layers.{i}."
        qkv = Linear(f"{p}self_attn.qkv_proj.weight", "qkv_proj", (q + 2 * kv, hidden),
                     parts=(("q", Rows(0, q)), ("k", Rows(q, q + kv)), ("v", Rows(q + kv, q + 2 * kv))),
                     # Q and K rows are not clip-searched: their error shows in attention scores, not in
                     # the linear's output the clip search scores (AutoAWQ's practice too); V rows are.
                     unclipped=("q", "k"))
        attention = Attention("dense", heads, kv_heads, head_dim, scale=float(head_dim**-0.5), qkv=qkv,
                              o=Linear(f"{p}self_attn.o_proj.weight", "o_proj", (hidden, q)),
                              sliding_window=config.get("sliding_window"))
        gate_up = Linear(f"{p}mlp.gate_up_proj.weight", "gate_up_proj", (2 * inter, hidden),
                         parts=(("gate", Rows(0, inter)), ("up", Rows(inter, 2 * inter))))
        mlp = Mlp("swiglu", inter, gate_up, Linear(f"{p}mlp.down_proj.weight", "down_proj", (hidden, inter)))
        attn_norm = Norm("rms", f"{p}input_layernorm.weight", eps, module="input_layernorm")
        mlp_norm = Norm("rms", f"{p}post_attention_layernorm.weight", eps, module="post_attention_layernorm")
        groups = (
            ScalingGroup(prev=attn_norm, linears=(qkv,), inspect="self_attn"),
            ScalingGroup(prev=mlp_norm, linears=(gate_up,), inspect="mlp"),
            ScalingGroup(prev=gate_up, prev_part="up", linears=(mlp.down,)),
            # V rows feed o_proj; under GQA one V channel feeds several heads' columns.
            ScalingGroup(prev=qkv, prev_part="v", linears=(attention.o,), kv_shared=attention.kv_layout),
        )
        return DecoderLayer(i, p, attn_norm, attention, mlp_norm, mlp, groups)

    @classmethod
    def plan(cls, config: dict[str, Any]) -> ModelPlan:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        vocab, tied = config["vocab_size"], bool(config.get("tie_word_embeddings", False))
        embedding = "model.embed_tokens.weight"
        decoder = Decoder(
            hidden=hidden, vocab=vocab, heads=heads, kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            embedding=embedding, layers=tuple(cls.layer(config, i) for i in range(config["num_hidden_layers"])),
            final_norm=Norm("rms", "model.norm.weight", rms_norm_eps(config)),
            lm_head=Linear(embedding if tied else "lm_head.weight", "lm_head", (vocab, hidden)), tied=tied,
            rotary=rotary_of(config, head_dim),
        )
        # A tied checkpoint may still carry the LM head's copy of the table; the plan reads the table once.
        ignorable = ("lm_head.weight",) if tied else ()
        return ModelPlan(architecture=config["architectures"][0], decoder=decoder, genai_type="phi3", ignorable=ignorable)

    @classmethod
    def weight_count(cls, facts: ModelFacts) -> int:
        h, hd, inter = facts.hidden_size, facts.head_dim, facts.intermediate_size
        q, kv = facts.num_heads * hd, facts.num_kv_heads * hd
        attention = h * (q + 2 * kv) + q * h
        mlp = h * 2 * inter + inter * h
        table = facts.vocab_size * h
        return facts.num_layers * (attention + mlp + 2 * h) + h + table * (1 if facts.tie_word_embeddings is True else 2)

    @classmethod
    def _hf_config(cls, config: dict[str, Any]):
        from transformers import Phi3Config
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it advises a `factor` key for LongRoPE: the published files have none
        try:
            hf = Phi3Config(**hf_phi3_keys(config))
        finally:
            hf_logging.set_verbosity(verbosity)
        hf._attn_implementation = "eager"  # explicit mask below: same numbers on every machine
        return hf

    @classmethod
    def calibration_layer(cls, config: dict[str, Any], layer: DecoderLayer):
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

        return Phi3DecoderLayer(cls._hf_config(config), layer.index).eval()

    @classmethod
    def calibration_inputs(cls, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
        import torch
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        hf = cls._hf_config(config)
        positions = torch.arange(seq_len)[None, :]
        cos, sin = Phi3RotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
        mask = causal_mask(seq_len, hf.sliding_window)
        return {"position_embeddings": (cos, sin), "attention_mask": mask, "position_ids": positions}
