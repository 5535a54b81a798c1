"""`phi3-export sweep`: quantize -> validate -> report over a grid of settings, in one command."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.paths import check_separate
from phi3_export.progress import Progress


@dataclass(frozen=True)
class Point:
    method: str
    block_size: int
    symmetric: bool | None  # None: the recipe's

    @property
    def folder(self) -> str:
        return f"{self.method}-g{self.block_size}" + {True: "s", False: "a", None: ""}[self.symmetric]


def grid(methods: tuple[str, ...], block_sizes: tuple[int, ...], symmetries: tuple[bool, ...]) -> list[Point]:
    from phi3_export.quant.stage import QUANTIZERS

    for method in methods:
        if method not in QUANTIZERS:
            raise Phi3ExportError(f"--method: unknown method {method!r} ({', '.join(QUANTIZERS)})")
    return [Point(m, b, s) for m, b, s in itertools.product(methods, block_sizes, symmetries)]


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
    with progress.task("sweep", len(points)) as task:
        for point in points:
            folder = runs / point.folder
            quantize(checkpoint, folder, recipe=recipe, method=point.method, targets=targets, block_size=point.block_size,
                     symmetric=point.symmetric, force=True, progress=progress, **{"bits": 4, **(quantize_options or {})})
            result = validate_artifacts(folder, checkpoint, validate_options, progress)
            path = folder.with_name(point.folder + ".validate.json")
            path.write_text(json.dumps(result, indent=1) + "\n")
            results.append(path)
            task.advance(point.folder)
    return build_report(results, out / "report", baseline=baseline, overrides=overrides)
