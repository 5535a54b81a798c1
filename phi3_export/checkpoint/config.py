"""config.json normalisation: one view of RoPE whichever way the file spells it.

Published Phi configs write ``rope_scaling`` (type "su" or "longrope") beside
``rope_theta``; transformers 5 writes ``rope_parameters`` holding all of it. Both, and
``partial_rotary_factor`` at either place, are read here.

``check_config`` range-checks every value phi3-export reads, before anything is built from it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NoReturn

from phi3_export.errors import Phi3ExportError


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "su":
        kind = "longrope"
    theta = _first(merged.get("rope_theta"), config.get("rope_theta"), 10000.0)
    partial = _first(merged.get("partial_rotary_factor"), config.get("partial_rotary_factor"), 1.0)
    return {
        "kind": kind,
        "theta": float(theta),
        "partial_rotary_factor": float(partial),
        "short_factor": merged.get("short_factor"),
        "long_factor": merged.get("long_factor"),
        "attention_factor": merged.get("attention_factor"),
        # Phi-3.5-MoE publishes its LongRoPE cos/sin multipliers instead of deriving them.
        "short_mscale": merged.get("short_mscale"),
        "long_mscale": merged.get("long_mscale"),
        "original_max_position_embeddings": merged.get("original_max_position_embeddings"),
    }


# ---- config.json, range-checked before anything is built from it ---------------------------

# Bounds well beyond any published model, tight enough that nothing built from the config
# (the plan, RoPE tables, memory estimates) can blow up before the checkpoint is compared.
LIMITS = {
    "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1024, "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12, "head_dim": 1 << 12, "vocab_size": 1 << 21, "max_position_embeddings": 1 << 22,
    "original_max_position_embeddings": 1 << 22, "sliding_window": 1 << 22, "num_local_experts": 256,
    "num_experts_per_tok": 256,
}
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def intermediate_size(config: dict[str, Any]) -> int:
    """The MLP width: ``intermediate_size``, or ``ff_intermediate_size`` as Phi-3-small spells it."""
    return _first(config.get("intermediate_size"), config.get("ff_intermediate_size"))
ROPE_KINDS = ("default", "longrope", "su")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r:.40}"
    if isinstance(value, str):
        return f"the string {value!r:.40}"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


class _Checker:
    def __init__(self, config: dict[str, Any], source: str):
        self.config, self.source = config, source

    def fail(self, key: str, problem: str) -> NoReturn:
        raise Phi3ExportError(f"{self.source}: {key}: {problem}")

    def integer(self, key: str, value: object, lo: int = 1, hi: int | None = None) -> int:
        hi = LIMITS.get(key.rsplit(".", 1)[-1], hi) if hi is None else hi
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, got {_kind(value)}")
        if value < lo or (hi is not None and value > hi):
            self.fail(key, f"{value} is out of range (expected {lo}..{hi})" if hi is not None else f"must be at least {lo}, got {value}")
        return value

    def number(self, key: str, value: object, *, positive: bool = True, le: float | None = None) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {_kind(value)}")
        if (positive and value <= 0) or value < 0 or (le is not None and value > le):
            bound = f"in (0, {le}]" if le is not None else ("positive" if positive else "non-negative")
            self.fail(key, f"must be {bound}, got {value}")
        return float(value)

    def get_int(self, key: str, default: int | None, lo: int = 1, hi: int | None = None) -> int | None:
        value = self.config.get(key)
        return default if value is None else self.integer(key, value, lo, hi)

    def token_ids(self, key: str) -> None:
        value = self.config.get(key)
        if isinstance(value, list):
            for v in value:
                self.integer(key, v, 0, 1 << 31)
        elif value is not None:
            self.integer(key, value, 0, 1 << 31)


def architecture_name(config: dict[str, Any], source: str | Path) -> str:
    """The first ``architectures`` entry of config.json (a non-empty list of names)."""
    names = config.get("architectures")
    if names is None:
        raise Phi3ExportError(f"{source}: no 'architectures' entry")
    if not isinstance(names, list) or not names:
        raise Phi3ExportError(f"{source}: architectures: must be a non-empty list of names, got {_kind(names)}"
                              + (" (empty)" if names == [] else ""))
    if not all(isinstance(n, str) and n for n in names):
        raise Phi3ExportError(f"{source}: architectures: every entry must be a name (string), got {names!r:.80}")
    return names[0]


def check_config(config: object, source: str | Path, *, required: tuple[str, ...] = (),
                 fixed: dict[str, int] | None = None) -> None:
    """Every config.json value phi3-export reads, by type and range, in one place.

    A malformed config is a one-line Phi3ExportError naming ``source`` and the key, never a
    KeyError/ZeroDivisionError/TypeError later on. ``required``: keys the architecture needs
    beyond the common ones (num_local_experts for a MoE); ``fixed``: keys whose value the
    architecture supports only exactly (sparsemixer routing picks 2 experts).
    """
    source = str(source)
    if not isinstance(config, dict):
        raise Phi3ExportError(f"{source}: must be a JSON object, got {_kind(config)}")
    architecture_name(config, source)
    c = _Checker(config, source)
    for key in (*REQUIRED, *required):
        if config.get(key) is None:
            c.fail(key, "missing (a required key)")
    for key in ("model_type",):
        if key in config and not isinstance(config[key], str):
            c.fail(key, f"must be a string, got {_kind(config[key])}")
    hidden = c.integer("hidden_size", config["hidden_size"])
    heads = c.integer("num_attention_heads", config["num_attention_heads"])
    c.integer("num_hidden_layers", config["num_hidden_layers"])
    if config.get("intermediate_size") is None and config.get("ff_intermediate_size") is None:
        c.fail("intermediate_size", "missing (a required key; Phi-3-small spells it ff_intermediate_size)")
    for key in ("intermediate_size", "ff_intermediate_size"):
        if config.get(key) is not None:
            c.integer(key, config[key], hi=LIMITS["intermediate_size"])
    vocab = c.integer("vocab_size", config["vocab_size"])
    kv_heads = c.get_int("num_key_value_heads", heads)
    if heads % kv_heads:
        c.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    head_dim = c.get_int("head_dim", None)
    if head_dim is None:
        if hidden % heads:
            c.fail("num_attention_heads", f"{heads} does not divide hidden_size {hidden} (and no head_dim is given)")
        head_dim = hidden // heads
    ctx = c.get_int("max_position_embeddings", 4096)
    c.get_int("original_max_position_embeddings", None)
    c.get_int("sliding_window", None)
    experts = c.get_int("num_local_experts", None)
    if experts is not None:
        c.get_int("num_experts_per_tok", 2, 1, experts)
    for key, want in (fixed or {}).items():
        if config.get(key) is not None and config[key] != want:
            c.fail(key, f"must be {want} for {config['architectures'][0]}, got {_kind(config[key])}")
    if config.get("rms_norm_eps") is not None:
        c.number("rms_norm_eps", config["rms_norm_eps"], le=1.0)
    if config.get("layer_norm_epsilon") is not None:
        c.number("layer_norm_epsilon", config["layer_norm_epsilon"], le=1.0)
    _check_phi3small_keys(c)
    if config.get("router_jitter_noise") is not None:
        c.number("router_jitter_noise", config["router_jitter_noise"], positive=False, le=1.0)
    for key in ("tie_word_embeddings", "attention_bias", "lm_head_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            c.fail(key, f"must be true or false, got {_kind(config[key])}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        c.token_ids(key)
    _check_rope(c, head_dim, ctx, vocab)


def _check_phi3small_keys(c: _Checker) -> None:
    """Phi-3-small's own keys (muP multipliers, GEGLU limit, blocksparse pattern, dummy ids), where present."""
    config = c.config
    for key in ("gegelu_limit", "mup_attn_multiplier", "mup_embedding_multiplier", "mup_width_multiplier", "rope_embedding_base",
                "rope_position_scale"):
        if config.get(key) is not None:
            c.number(key, config[key])
    for key in ("blocksparse_block_size", "blocksparse_num_local_blocks", "blocksparse_vert_stride", "dense_attention_every_n_layers"):
        if config.get(key) is not None:
            c.integer(key, config[key], hi=1 << 20)
    for key in ("blocksparse_homo_head_pattern", "mup_use_scaling"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            c.fail(key, f"must be true or false, got {_kind(config[key])}")
    dummy = config.get("dummy_token_indices")
    if dummy is not None:
        if not isinstance(dummy, list):
            c.fail("dummy_token_indices", f"must be a list of token ids, got {_kind(dummy)}")
        for value in dummy:
            c.integer("dummy_token_indices", value, 0, config["vocab_size"] - 1)


def _check_rope(c: _Checker, head_dim: int, ctx: int, vocab: int) -> None:
    config = c.config
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            c.fail(key, f"must be an object (or null), got {_kind(config[key])}")
    merged = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    where = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind not in ROPE_KINDS:
        c.fail(f"{where}.rope_type", f"{kind!r:.40} is not supported (supported: default, longrope)")
    for key in ("rope_theta", "partial_rotary_factor"):
        if merged.get(key) is not None:
            c.number(f"{where}.{key}", merged[key], le=1.0 if key == "partial_rotary_factor" else None)
        elif config.get(key) is not None:
            c.number(key, config[key], le=1.0 if key == "partial_rotary_factor" else None)
    for key in ("attention_factor", "short_mscale", "long_mscale"):
        if merged.get(key) is not None:
            c.number(f"{where}.{key}", merged[key])
    if merged.get("original_max_position_embeddings") is not None:
        c.integer(f"{where}.original_max_position_embeddings", merged["original_max_position_embeddings"])
    rope = rope_settings(config)
    rotary_dim = int(head_dim * rope["partial_rotary_factor"])
    if rotary_dim < 2 or rotary_dim % 2:
        c.fail("partial_rotary_factor", f"{rope['partial_rotary_factor']} of head_dim {head_dim} gives {rotary_dim} "
                                        "rotary dimensions (must be even and at least 2)")
    if rope["kind"] == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = merged.get(key)
            if not isinstance(factors, list):
                c.fail(f"{where}.{key}", f"LongRoPE needs a list of {rotary_dim // 2} numbers, got {_kind(factors)}")
            if len(factors) != rotary_dim // 2:
                c.fail(f"{where}.{key}", f"has {len(factors)} entries, LongRoPE needs {rotary_dim // 2} (rotary dimensions / 2)")
            for value in factors:
                c.number(f"{where}.{key}", value)
        orig = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or ctx
        if orig < 2:
            c.fail("original_max_position_embeddings", f"LongRoPE needs at least 2, got {orig}")
