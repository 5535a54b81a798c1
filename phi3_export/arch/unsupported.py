"""Phi architectures the registry knows but cannot export yet; each says why."""

from phi3_export.arch.base import Architecture
from phi3_export.arch.registry import register


@register
class Phi3Vision(Architecture):
    names = ("Phi3VForCausalLM",)
    supported = False
    why_unsupported = "the CLIP image encoder and projector are not exported yet"
