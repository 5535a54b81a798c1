"""One quantize run's inputs, handed to every stage as one object (not long argument lists)."""

from __future__ import annotations

from dataclasses import dataclass

from phi3_export.arch.base import Architecture
from phi3_export.arch.plan import ModelPlan
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.progress import Progress
from phi3_export.quant.settings import QuantSettings
from phi3_export.recipes.schema import ModelFacts, Recipe


@dataclass(frozen=True)
class Job:
    ckpt: Checkpoint
    arch: type[Architecture]
    plan: ModelPlan
    facts: ModelFacts
    recipe: Recipe
    settings: QuantSettings
    progress: Progress
