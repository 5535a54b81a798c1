"""Which artifacts a path names: an OUT folder (all of its manifest) or one artifact folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from phi3_export.errors import Phi3ExportError


@dataclass
class Artifact:
    name: str
    folder: Path
    entry: dict  # the manifest's record: target, format, providers, max_length, files...
    manifest: dict

    @cached_property
    def genai_config(self) -> dict:
        return _read_json(self.folder / "genai_config.json")

    @property
    def max_length(self) -> int:
        return self.genai_config["search"]["max_length"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Phi3ExportError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def find_artifacts(path: Path) -> list[Artifact]:
    path = Path(path)
    if not path.is_dir():
        raise Phi3ExportError(f"{path}: no such folder")
    if (path / "manifest.json").is_file():
        out, only = path, None
    elif (path.parent / "manifest.json").is_file():
        out, only = path.parent, path.name
    else:
        raise Phi3ExportError(f"{path}: no manifest.json here or in its parent (not a phi3-export output)")
    manifest = _read_json(out / "manifest.json")
    entries = manifest.get("artifacts")
    if not isinstance(entries, list):
        raise Phi3ExportError(f"{out / 'manifest.json'}: no 'artifacts' list")
    found = [Artifact(e["name"], out / e["path"], e, manifest) for e in entries if only in (None, e["path"])]
    if not found:
        raise Phi3ExportError(f"{path}: not listed in {out / 'manifest.json'}")
    for artifact in found:
        if not artifact.folder.is_dir():
            raise Phi3ExportError(f"{artifact.folder}: listed in the manifest but missing")
    return found
