"""Paths read from manifests and bundles resolve inside their folder, or not at all.

A manifest is data from disk (maybe edited, maybe hostile): an entry like ``../../etc/passwd``,
an absolute path or a symlink pointing elsewhere must never make phi3-export read, copy or
"verify" a file outside the folder the manifest describes.
"""

from __future__ import annotations

from pathlib import Path

from phi3_export.errors import Phi3ExportError


def inside(root: Path, relative: object, what: str) -> Path:
    """``root / relative``, refused (one line naming ``what``) unless it stays inside ``root``."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise Phi3ExportError(f"{what}: {relative!r} is not a relative path inside {root}")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise Phi3ExportError(f"{what}: {relative!r} resolves outside {root}")
    return path


def symlinks_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_symlink())


def check_separate(out: Path, source: Path, flag: str) -> None:
    """Refuse an output folder that is, contains, or lies inside an input folder (it would be written into or replaced)."""
    out_r, source_r = Path(out).resolve(), Path(source).resolve()
    if out_r.is_relative_to(source_r) or source_r.is_relative_to(out_r):
        raise Phi3ExportError(f"--out {out}: overlaps {flag} {source}; the input is never written to: choose another --out")
