"""`phi3-export sweep`: quantize -> validate -> report over a grid of settings, in one command."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.paths import check_separate
from phi3_export.progress import Progress

NO_BUDGET = "none"


@dataclass(frozen=True)
class Point:
    method: str
    block_size: int | None  # None: a size budget's point (the budget chooses each tensor's block size)
    symmetric: bool | None  # None: the recipe's
    size_budget: str | None = None
    accuracy_level: int | None = None  # None: each target's

    @property
    def folder(self) -> str:
        size = f"{self.size_budget}-" if self.size_budget else f"g{self.block_size}"
        level = f"-al{self.accuracy_level}" if self.accuracy_level is not None else ""
        return f"{self.method}-{size}" + {True: "s", False: "a", None: ""}[self.symmetric] + level

    def quantize_options(self) -> dict:
        given = {"block_size": self.block_size, "size_budget": self.size_budget, "accuracy_level": self.accuracy_level}
        return {"method": self.method, "symmetric": self.symmetric, **{k: v for k, v in given.items() if v is not None}}


def grid(methods: tuple[str, ...], block_sizes: tuple[int, ...], symmetries: tuple[bool, ...],
         size_budgets: tuple[str, ...] = (), accuracy_levels: tuple[int | None, ...] = (None,)) -> list[Point]:
    """Every method x symmetry x accuracy level, at each block size (``none`` among the budgets, or no
    budgets) and at each size budget (the budget picks block sizes and bit widths per tensor)."""
    from phi3_export.quant.stage import QUANTIZERS

    for method in methods:
        if method not in QUANTIZERS:
            raise Phi3ExportError(f"--method: unknown method {method!r} ({', '.join(QUANTIZERS)})")
    budgets = size_budgets or (NO_BUDGET,)
    points = []
    for method, symmetric, level in itertools.product(methods, symmetries, accuracy_levels):
        for budget in budgets:
            if budget == NO_BUDGET:
                points += [Point(method, b, symmetric, None, level) for b in block_sizes]
            else:
                points.append(Point(method, None, symmetric, budget, level))
    return points


def sweep(checkpoint: Path, out: Path, *, recipe: str | None, points: list[Point], targets: tuple[str, ...],
          validate_options, progress: Progress, baseline: Path | None = None, overrides: dict | None = None,
          quantize_options: dict | None = None) -> dict:
    """``quantize_options``: the other `quantize` keyword arguments, the same for every point (bits, calibration...)."""
    from phi3_export.api import quantize
    from phi3_export.report import build_report
    from phi3_export.validate.run import validate_artifacts

    out = Path(out)
    check_separate(out, checkpoint, "--checkpoint")
    runs = out / "runs"
    results = []
    # One file of measured sensitivities for every budget point: they depend on the checkpoint and
    # the calibration, not on the budget or the method (quant/budget.py keys them so).
    sensitivities = runs / ".budget-sensitivity.json"
    with progress.task("sweep", len(points)) as task:
        for point in points:
            folder = runs / point.folder
            quantize(checkpoint, folder, recipe=recipe, targets=targets, force=True, progress=progress,
                     sensitivity_cache=sensitivities, **{"bits": 4, **(quantize_options or {}), **point.quantize_options()})
            result = validate_artifacts(folder, checkpoint, validate_options, progress)
            path = folder.with_name(point.folder + ".validate.json")
            path.write_text(json.dumps(result, indent=1) + "\n")
            results.append(path)
            task.advance(point.folder)
    sensitivities.unlink(missing_ok=True)
    return build_report(results, out / "report", baseline=baseline, overrides=overrides)
