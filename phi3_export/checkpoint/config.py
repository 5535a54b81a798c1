"""config.json normalisation: one view of RoPE whichever way the file spells it.

Published Phi configs write ``rope_scaling`` (type "su" or "longrope") beside
``rope_theta``; transformers 5 writes ``rope_parameters`` holding all of it. Both, and
``partial_rotary_factor`` at either place, are read here.
"""

from __future__ import annotations

from typing import Any


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "su":
        kind = "longrope"
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    partial = merged.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
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
