"""Phi3SmallForCausalLM: Phi-3-small 8k and 128k (7B; published as remote code only).

Pre-norm decoder with LayerNorm (weight and bias, ``layer_norm_epsilon``); every linear has
a bias. Attention reads one fused ``query_key_value`` in head-group-major order (per KV
group: its query heads, then k, then v), rotates halves with base ``rope_embedding_base``
(LongRoPE for 128k), scales q.k by ``mup_attn_multiplier / head_dim`` (muP), and is dense on
layers ``i`` with ``(i + 1) % dense_attention_every_n_layers == 0``, blocksparse on the others
(arch/blocksparse.py). The MLP is GEGLU on interleaved rows of ``up_proj`` with clamps. The
embedding output is multiplied by ``mup_embedding_multiplier``, the logits divided by
``mup_width_multiplier``, and the tokenizer's unused ("dummy") ids masked to the lowest logit.
The LM head is the embedding table unless ``tie_word_embeddings`` is false.

Facts: shared/reference/family-next.md; semantics in arch/phi3small_layer.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from phi3_export.arch.base import Architecture, causal_mask
from phi3_export.arch.blocksparse import BlockSparse
from phi3_export.arch.phi3 import longrope_attention_factor, model_facts, rotary_of
from phi3_export.arch.plan import Attention, Decoder, DecoderLayer, Linear, Mlp, ModelPlan, Norm, Rows, ScalingGroup
from phi3_export.arch.registry import register
from phi3_export.checkpoint.config import intermediate_size, rope_settings
from phi3_export.recipes.schema import ModelFacts

# Phi3SmallTokenizer.dummy_token_indices of the published tokenizer (cl100k ranks + Phi-3
# chat tokens in 100352 ids): the ids no token uses. The published config.json does not carry
# them (the config class derives them from the tokenizer); a config.json that has a
# ``dummy_token_indices`` list (our fixtures) overrides this.
PUBLISHED_DUMMY_IDS = (100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352))


def _dims(config: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return {"hidden": hidden, "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": hidden // heads, "inter": intermediate_size(config),
            "eps": float(config.get("layer_norm_epsilon") or 1e-5)}


def rope_base(config: dict[str, Any]) -> float:
    """RoPE base: ``rope_embedding_base`` (published default 1e6); a ``rope_theta`` key is not read."""
    return float(config.get("rope_embedding_base") or 1e6)


def blocksparse_of(config: dict[str, Any]) -> BlockSparse:
    return BlockSparse(block=config.get("blocksparse_block_size") or 64,
                       local_blocks=config.get("blocksparse_num_local_blocks") or 16,
                       vert_stride=config.get("blocksparse_vert_stride") or 8,
                       homo_head=bool(config.get("blocksparse_homo_head_pattern", False)))


def dense_every(config: dict[str, Any]) -> int | None:
    """Every n-th layer attends densely (None or 0: every layer is blocksparse)."""
    return config.get("dense_attention_every_n_layers")


def is_dense_layer(config: dict[str, Any], i: int) -> bool:
    every = dense_every(config)
    return bool(every) and (i + 1) % every == 0


def attention_scale(config: dict[str, Any], head_dim: int) -> float:
    """muP: 1 / (head_dim / mup_attn_multiplier); without mup_use_scaling, 1 / sqrt(head_dim)."""
    if config.get("mup_use_scaling", True):
        return float(config.get("mup_attn_multiplier") or 1.0) / head_dim
    return 1.0 / math.sqrt(head_dim)


def tied(config: dict[str, Any]) -> bool:
    # The published config.json omits the key; transformers' PretrainedConfig default (true) applies.
    return bool(config.get("tie_word_embeddings", True))


def masked_ids(config: dict[str, Any]) -> tuple[int, ...]:
    ids = config.get("dummy_token_indices")
    if ids is None:
        ids = [i for i in PUBLISHED_DUMMY_IDS if i < config["vocab_size"]]
    return tuple(sorted(set(ids)))


@register
class Phi3Small(Architecture):
    names = ("Phi3SmallForCausalLM",)
    # Positions scaled by rope_position_scale (1.0 in every published config) are not part of
    # the plan's Rotary; a config with another value is refused rather than exported wrong.
    config_fixed: ClassVar[dict[str, float]] = {"rope_position_scale": 1.0}
    tiktoken_tokenizer: ClassVar[str] = "phi-3-small"  # no tokenizer.json: built from cl100k_base.tiktoken (checkpoint/tiktoken.py)

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        d, rope = _dims(config), rope_settings(config)
        ctx = config.get("max_position_embeddings") or 8192
        bs = blocksparse_of(config)
        return model_facts(
            architecture=config["architectures"][0], model_type=config.get("model_type") or "phi3small",
            num_layers=config["num_hidden_layers"], hidden_size=d["hidden"], num_heads=d["heads"], num_kv_heads=d["kv_heads"],
            head_dim=d["head_dim"], intermediate_size=d["inter"], vocab_size=config["vocab_size"], context_length=ctx,
            original_context_length=rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") or ctx,
            rope={"kind": rope["kind"], "theta": rope_base(config), "partial_rotary_factor": rope["partial_rotary_factor"]},
            sliding_window="none", tie_word_embeddings=tied(config), tokenizer=tokenizer_kind,
            blocksparse={"block_size": bs.block, "num_local_blocks": bs.local_blocks, "vert_stride": bs.vert_stride,
                         "homo_head_pattern": bs.homo_head, "dense_attention_every_n_layers": dense_every(config) or 0},
        )

    @classmethod
    def layer(cls, config: dict[str, Any], i: int) -> DecoderLayer:
        d, p = _dims(config), f"model.layers.{i}."
        hidden, hd, heads, kv_heads, inter = d["hidden"], d["head_dim"], d["heads"], d["kv_heads"], d["inter"]
        rep = heads // kv_heads
        group_rows = (rep + 2) * hd  # one KV group: rep query heads, its k, its v
        total = kv_heads * group_rows

        def linear(path: str, role: str, shape: tuple[int, int], **kw) -> Linear:
            return Linear(f"{p}{path}.weight", role, shape, bias=f"{p}{path}.bias", **kw)

        def norm(module: str) -> Norm:
            return Norm("layer", f"{p}{module}.weight", d["eps"], bias=f"{p}{module}.bias", module=module)

        qkv = linear("self_attn.query_key_value", "query_key_value", (total, hidden),
                     parts=(("q", Rows(0, total, group_rows, rep * hd)),
                            ("k", Rows(rep * hd, total, group_rows, hd)),
                            ("v", Rows((rep + 1) * hd, total, group_rows, hd))),
                     # As for Phi-3: Q and K errors show in attention scores, not in the output the clip search scores.
                     unclipped=("q", "k"))
        dense = is_dense_layer(config, i)
        attention = Attention("dense" if dense else "blocksparse", heads, kv_heads, hd, scale=attention_scale(config, hd),
                              qkv=qkv, o=linear("self_attn.dense", "dense", (hidden, heads * hd)),
                              blocksparse=None if dense else blocksparse_of(config))
        up = linear("mlp.up_proj", "up_proj", (2 * inter, hidden),
                    parts=(("gate", Rows(0, 2 * inter, 2)), ("linear", Rows(1, 2 * inter, 2))))
        limit = config.get("gegelu_limit")
        mlp = Mlp("geglu", inter, up, linear("mlp.down_proj", "down_proj", (hidden, inter)),
                  limit=None if limit is None else float(limit))
        attn_norm, mlp_norm = norm("input_layernorm"), norm("post_attention_layernorm")
        groups = (
            ScalingGroup(prev=attn_norm, linears=(qkv,), inspect="self_attn"),
            # V rows feed the output projection; under GQA one V channel feeds several heads' columns.
            ScalingGroup(prev=qkv, prev_part="v", linears=(attention.o,), kv_shared=attention.kv_layout),
            ScalingGroup(prev=mlp_norm, linears=(up,), inspect="mlp"),
            # No up -> down group: the GEGLU clamps and the (l + 1) term do not commute with a
            # per-channel scale, so folding 1/s into up's rows would change the model.
        )
        return DecoderLayer(i, p, attn_norm, attention, mlp_norm, mlp, groups)

    @classmethod
    def plan(cls, config: dict[str, Any]) -> ModelPlan:
        d = _dims(config)
        vocab, is_tied = config["vocab_size"], tied(config)
        embedding = "model.embed_tokens.weight"
        rope = rope_settings(config)
        # The published rotary multiplies cos/sin by short_mscale / long_mscale where positive;
        # otherwise 1.0 on the short factors (unlike Phi-3-mini's LongRoPE, which scales both) and
        # sqrt(1 + ln(context / original) / ln(original)) on the long ones.
        short, long = rope.get("short_mscale") or -1, rope.get("long_mscale") or -1
        mscales = (short if short > 0 else 1.0, long if long > 0 else longrope_attention_factor(config, rope))
        embedding_scale = config.get("mup_embedding_multiplier")
        width = config.get("mup_width_multiplier")
        decoder = Decoder(
            hidden=d["hidden"], vocab=vocab, heads=d["heads"], kv_heads=d["kv_heads"], head_dim=d["head_dim"],
            embedding=embedding, layers=tuple(cls.layer(config, i) for i in range(config["num_hidden_layers"])),
            final_norm=Norm("layer", "model.final_layernorm.weight", d["eps"], bias="model.final_layernorm.bias"),
            lm_head=Linear(embedding if is_tied else "lm_head.weight", "lm_head", (vocab, d["hidden"])), tied=is_tied,
            rotary=dataclasses.replace(rotary_of(config, d["head_dim"], mscales), theta=rope_base(config)),
            embedding_scale=float(embedding_scale) if embedding_scale and embedding_scale > 0 else 1.0,
            logits_scale=1.0 / float(width) if width else 1.0,
            masked_ids=masked_ids(config),
        )
        return ModelPlan(
            architecture=config["architectures"][0], decoder=decoder, genai_type="phi3small",
            refused_formats={"coreai": "Core AI emitters for LayerNorm, GEGLU and blocksparse attention are not written yet"},
            # A tied checkpoint may still carry the LM head's copy of the table; the plan reads the table once.
            ignorable=("lm_head.weight",) if is_tied else (),
        )

    @classmethod
    def weight_count(cls, facts: ModelFacts) -> int:
        h, hd, inter = facts.hidden_size, facts.head_dim, facts.intermediate_size
        q, kv = facts.num_heads * hd, facts.num_kv_heads * hd
        attention = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h
        mlp = h * 2 * inter + 2 * inter + inter * h + h
        table = facts.vocab_size * h
        return facts.num_layers * (attention + mlp + 4 * h) + 2 * h + table * (1 if facts.tie_word_embeddings is True else 2)

    @classmethod
    def calibration_layer(cls, config: dict[str, Any], layer: DecoderLayer):
        from phi3_export.arch.phi3small_layer import Phi3SmallLayer

        return Phi3SmallLayer(config, layer.index).eval()

    @classmethod
    def calibration_inputs(cls, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
        """RoPE tables and the causal mask; a blocksparse layer adds its own pattern (phi3small_layer)."""
        import torch

        from phi3_export.arch.phi3small_layer import rotary_embedding

        positions = torch.arange(seq_len)[None, :]
        cos, sin = rotary_embedding(config, positions)
        return {"position_embeddings": (cos, sin), "attention_mask": causal_mask(seq_len, None), "position_ids": positions}
