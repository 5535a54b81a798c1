"""PhiMoEForCausalLM: Phi-3.5-MoE (16 experts, top-2 sparsemixer routing, 42B parameters).

Pre-norm decoder with LayerNorm (weight and bias), separate biased q/k/v/o projections into
GQA attention with LongRoPE (the config's own short/long mscales), and a mixture of experts:
a float router, sparsemixer top-2 routing, SwiGLU experts w2(silu(w1 x) * w3 x). The LM head
has a bias. Facts: shared/reference/family-next.md; semantics in arch/phimoe_layer.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

from phi3_export.arch.base import Architecture, causal_mask
from phi3_export.arch.phi3 import model_facts, rms_norm_eps, rotary_of
from phi3_export.arch.plan import Attention, Decoder, DecoderLayer, Expert, Linear, ModelPlan, Moe, Norm, ScalingGroup
from phi3_export.arch.registry import register
from phi3_export.checkpoint.config import rope_settings
from phi3_export.recipes.schema import ModelFacts


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _dims(config: dict[str, Any]) -> dict[str, int]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return {"hidden": hidden, "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or hidden // heads, "inter": config["intermediate_size"],
            "experts": config["num_local_experts"], "top_k": config.get("num_experts_per_tok") or 2}


@register
class PhiMoE(Architecture):
    names = ("PhiMoEForCausalLM", "PhimoeForCausalLM")  # as published; as transformers' save_pretrained names it
    # config.json keys beyond the common ones (checkpoint/config.py check_config), and values
    # supported only exactly: sparsemixer routing picks two experts (arch/phimoe_layer.py).
    config_required: ClassVar[tuple[str, ...]] = ("num_local_experts",)
    config_fixed: ClassVar[dict[str, int]] = {"num_experts_per_tok": 2}

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        d, rope = _dims(config), rope_settings(config)
        sliding = config.get("sliding_window")
        ctx = config.get("max_position_embeddings") or 4096
        return model_facts(
            architecture=config["architectures"][0], model_type=config.get("model_type") or "phimoe",
            num_layers=config["num_hidden_layers"], hidden_size=d["hidden"], num_heads=d["heads"], num_kv_heads=d["kv_heads"],
            head_dim=d["head_dim"], intermediate_size=d["inter"], vocab_size=config["vocab_size"], context_length=ctx,
            original_context_length=config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or ctx,
            rope={"kind": rope["kind"], "theta": rope["theta"], "partial_rotary_factor": rope["partial_rotary_factor"]},
            sliding_window="none" if sliding is None else sliding,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), tokenizer=tokenizer_kind,
            num_experts=d["experts"], experts_per_token=d["top_k"],
        )

    @classmethod
    def layer(cls, config: dict[str, Any], i: int) -> DecoderLayer:
        d, p = _dims(config), f"model.layers.{i}."
        hidden, hd, eps = d["hidden"], d["head_dim"], rms_norm_eps(config)
        q_rows, kv_rows = d["heads"] * hd, d["kv_heads"] * hd
        biased = bool(config.get("attention_bias", False))

        def linear(path: str, role: str, shape: tuple[int, int], bias: bool = False, **kw) -> Linear:
            return Linear(f"{p}{path}.weight", role, shape, bias=f"{p}{path}.bias" if bias else None, **kw)

        def norm(module: str) -> Norm:
            return Norm("layer", f"{p}{module}.weight", eps, bias=f"{p}{module}.bias", module=module)

        # Q and K rows are not clip-searched: their error shows in attention scores, not in the
        # linear's output the clip search scores (as for Phi-3's fused qkv); V is.
        q = linear("self_attn.q_proj", "q_proj", (q_rows, hidden), biased, unclipped=("*",))
        k = linear("self_attn.k_proj", "k_proj", (kv_rows, hidden), biased, unclipped=("*",))
        v = linear("self_attn.v_proj", "v_proj", (kv_rows, hidden), biased)
        attention = Attention("dense", d["heads"], d["kv_heads"], hd, scale=float(hd**-0.5), q=q, k=k, v=v,
                              o=linear("self_attn.o_proj", "o_proj", (hidden, q_rows), biased),
                              sliding_window=config.get("sliding_window"))
        experts = tuple(
            Expert(gate=linear(f"block_sparse_moe.experts.{e}.w1", "expert_gate", (d["inter"], hidden)),
                   up=linear(f"block_sparse_moe.experts.{e}.w3", "expert_up", (d["inter"], hidden)),
                   down=linear(f"block_sparse_moe.experts.{e}.w2", "expert_down", (hidden, d["inter"])))
            for e in range(d["experts"])
        )
        # The router picks experts from its logits: never quantized.
        router = linear("block_sparse_moe.gate", "router", (d["experts"], hidden), quantize=False)
        moe = Moe("moe", d["inter"], router, experts, d["top_k"], "sparsemixer",
                  jitter_eps=float(_or(config.get("router_jitter_noise"), 0.01)))
        attn_norm, mlp_norm = norm("input_layernorm"), norm("post_attention_layernorm")
        groups = (
            ScalingGroup(prev=attn_norm, linears=(q, k, v), inspect="self_attn"),
            # V rows feed o_proj; under GQA one V channel feeds several heads' columns.
            ScalingGroup(prev=v, linears=(attention.o,), kv_shared=attention.kv_layout),
            # Every expert's gate and up read the post-attention norm, as does the (float) router,
            # whose columns take the same scale so routing is unchanged.
            ScalingGroup(prev=mlp_norm, linears=tuple(lin for x in experts for lin in (x.gate, x.up)), also_scaled=(router,),
                         inspect="block_sparse_moe"),
            # Per expert, calibrated on the tokens the router sends it: up rows -> down columns.
            *(ScalingGroup(prev=x.up, linears=(x.down,)) for x in experts),
        )
        return DecoderLayer(i, p, attn_norm, attention, mlp_norm, moe, groups)

    @classmethod
    def plan(cls, config: dict[str, Any]) -> ModelPlan:
        d = _dims(config)
        vocab, eps = config["vocab_size"], rms_norm_eps(config)
        rope = rope_settings(config)
        mscales = (rope["short_mscale"], rope["long_mscale"]) if rope.get("short_mscale") is not None else None
        decoder = Decoder(
            hidden=d["hidden"], vocab=vocab, heads=d["heads"], kv_heads=d["kv_heads"], head_dim=d["head_dim"],
            embedding="model.embed_tokens.weight",
            layers=tuple(cls.layer(config, i) for i in range(config["num_hidden_layers"])),
            final_norm=Norm("layer", "model.norm.weight", eps, bias="model.norm.bias"),
            lm_head=Linear("lm_head.weight", "lm_head", (vocab, d["hidden"]),
                           bias="lm_head.bias" if config.get("lm_head_bias", False) else None),
            tied=False, rotary=rotary_of(config, d["head_dim"], mscales),
        )
        return ModelPlan(
            architecture=config["architectures"][0], decoder=decoder, genai_type="phimoe",
            refused_formats={fmt: "Phi-3.5-MoE has 42B parameters (~21 GB at 4 bits): no iPhone, iPad or Mac "
                                  f"that {runtime} deploys to holds it"
                             for fmt, runtime in (("coreml", "Core ML"), ("coreai", "Core AI"))},
        )

    @classmethod
    def weight_count(cls, facts: ModelFacts) -> int:
        h, hd, inter, experts = facts.hidden_size, facts.head_dim, facts.intermediate_size, facts.num_experts or 1
        q, kv = facts.num_heads * hd, facts.num_kv_heads * hd
        attention = h * (q + 2 * kv) + q * h
        moe = experts * 3 * h * inter + experts * h
        return facts.num_layers * (attention + moe + 4 * h) + 2 * h + 2 * facts.vocab_size * h

    @classmethod
    def calibration_layer(cls, config: dict[str, Any], layer: DecoderLayer):
        from phi3_export.arch.phimoe_layer import PhiMoELayer

        return PhiMoELayer(config).eval()

    @classmethod
    def calibration_inputs(cls, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
        import torch

        from phi3_export.arch.phimoe_layer import rotary_embedding

        positions = torch.arange(seq_len)[None, :]
        cos, sin = rotary_embedding(config, positions)
        return {"position_embeddings": (cos, sin), "attention_mask": causal_mask(seq_len, config.get("sliding_window")),
                "position_ids": positions}
