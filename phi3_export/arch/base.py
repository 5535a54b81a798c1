"""What an architecture module declares. Algorithms read these facts and never name a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from phi3_export.recipes.schema import ModelFacts


@dataclass(frozen=True)
class ScalingGroup:
    """An AWQ scaling group: linears that share an input, and where 1/s is folded.

    ``prev`` is the role the inverse scale folds into (a norm's weight, or rows of a
    linear); ``prev_rows`` names which rows of a fused ``prev`` linear feed ``linears``
    ("up" half of gate_up, "v" rows of qkv). ``kv_shared`` marks a group whose scale must
    be one per KV-head channel, repeated to the query heads that share it (GQA).
    ``inspect`` names the layer submodule whose output scores a candidate scale (attention,
    MLP), so the search sees what follows the linears; without it the linears' own outputs do.
    """

    prev: str
    linears: tuple[str, ...]
    prev_rows: Literal["all", "up", "v"] = "all"
    kv_shared: bool = False
    inspect: str | None = None


@dataclass(frozen=True)
class Rotary:
    cos_sin_cache_length: int
    rotary_dim: int
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None


class Architecture:
    """Base of the declarative architecture modules (see arch/phi3.py)."""

    names: ClassVar[tuple[str, ...]]
    supported: ClassVar[bool] = True
    why_unsupported: ClassVar[str] = ""

    # Tensor names in the HF checkpoint; "{i}" is the decoder layer index.
    embed: ClassVar[str]
    final_norm: ClassVar[str]
    lm_head: ClassVar[str]
    layer_norms: ClassVar[dict[str, str]]
    layer_linears: ClassVar[dict[str, str]]
    # How the fused projections split: role -> ordered (part, size-field) list.
    fused: ClassVar[dict[str, tuple[str, ...]]]
    scaling_groups: ClassVar[tuple[ScalingGroup, ...]]
    # Parts of fused linears whose rows the clip search leaves alone: role -> parts.
    no_clip: ClassVar[dict[str, tuple[str, ...]]] = {}
    rope_kinds: ClassVar[tuple[str, ...]]
    mlp_activation: ClassVar[str]

    # Prefix of one decoder layer's tensors; the rest of each name is the module path in
    # the layer module that calibration runs (``calibration_layer``).
    layer_prefix: ClassVar[str]

    @classmethod
    def part_sizes(cls, facts: ModelFacts) -> dict[str, int]:
        raise NotImplementedError

    @classmethod
    def weight_count(cls, facts: ModelFacts) -> int:
        """Weights of the whole model (tied tables once): what bits per weight divides by."""
        raise NotImplementedError

    @classmethod
    def rows_of(cls, role: str, part: str, facts: ModelFacts) -> slice:
        """The rows of fused weight ``role`` that hold ``part`` (e.g. the V rows of qkv_proj)."""
        sizes = cls.part_sizes(facts)
        start = 0
        for name in cls.fused[role]:
            if name == part:
                return slice(start, start + sizes[name])
            start += sizes[name]
        raise KeyError(f"{role} has no part {part!r}")

    @classmethod
    def module_path(cls, role: str) -> str:
        """'qkv_proj' -> 'self_attn.qkv_proj': where the role's module sits in the layer."""
        table = {**cls.layer_norms, **cls.layer_linears}
        return table[role].removeprefix(cls.layer_prefix).removesuffix(".weight")

    @classmethod
    def calibration_layer(cls, config: dict[str, Any], index: int):
        """A float32 torch module of decoder layer ``index`` (weights not loaded), for AWQ."""
        raise NotImplementedError

    @classmethod
    def loaded_layer(cls, config: dict[str, Any], index: int, weights: dict[str, Any]):
        """``calibration_layer`` with its weights set from ``weights`` (role -> tensor)."""
        layer = cls.calibration_layer(config, index)
        layer.load_state_dict({f"{cls.module_path(role)}.weight": w for role, w in weights.items()})
        return layer

    @classmethod
    def calibration_inputs(cls, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
        """Extra keyword inputs a calibration layer's forward needs (RoPE tables, mask)."""
        raise NotImplementedError

    @classmethod
    def layer_tensor(cls, role: str, i: int) -> str:
        table = {**cls.layer_norms, **cls.layer_linears}
        return table[role].format(i=i)

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        raise NotImplementedError

    @classmethod
    def rope_tables(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Extra RoPE data the exporters need (LongRoPE factor lists, attention factor)."""
        raise NotImplementedError
