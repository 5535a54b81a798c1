"""What an architecture module declares. Algorithms read its plan and never name a model."""

from __future__ import annotations

from typing import Any, ClassVar

from phi3_export.arch.plan import DecoderLayer, ModelPlan
from phi3_export.recipes.schema import ModelFacts


class Architecture:
    """Base of the architecture modules (see arch/phi3.py): config.json -> facts and plan."""

    names: ClassVar[tuple[str, ...]]
    supported: ClassVar[bool] = True
    why_unsupported: ClassVar[str] = ""

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        raise NotImplementedError

    @classmethod
    def plan(cls, config: dict[str, Any]) -> ModelPlan:
        """The typed plan every stage walks (arch/plan.py)."""
        raise NotImplementedError

    @classmethod
    def weight_count(cls, facts: ModelFacts) -> int:
        """Weights of the whole model (tied tables once): what bits per weight divides by."""
        raise NotImplementedError

    @classmethod
    def calibration_layer(cls, config: dict[str, Any], layer: DecoderLayer):
        """A float32 torch module of ``layer`` (weights not loaded) whose submodules are named
        as the layer's tensors minus ``layer.prefix``: AWQ hooks its linears, validate runs it."""
        raise NotImplementedError

    @classmethod
    def loaded_layer(cls, config: dict[str, Any], layer: DecoderLayer, weights: dict[str, Any]):
        """``calibration_layer`` with its weights set from ``weights`` (tensor name -> tensor)."""
        module = cls.calibration_layer(config, layer)
        module.load_state_dict({name.removeprefix(layer.prefix): w for name, w in weights.items()})
        return module

    @classmethod
    def calibration_inputs(cls, config: dict[str, Any], seq_len: int) -> dict[str, Any]:
        """Extra keyword inputs a calibration layer's forward needs (RoPE tables, mask)."""
        raise NotImplementedError


def causal_mask(seq_len: int, sliding_window: int | None):
    """[1, 1, seq, seq] additive mask: causal, and windowed when the model slides."""
    import torch

    query, key = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    visible = key <= query
    if sliding_window is not None:
        visible &= key > query - sliding_window
    return torch.zeros(seq_len, seq_len).masked_fill(~visible, float("-inf"))[None, None]
