"""OUT/manifest.json: what `quantize` writes beside its artifacts and `validate`, `package` and `report` read.

    {"schema_version": 1,
     "tool": {"name", "version"}, "versions": {library: version},
     "source": {"architecture", "config_sha256"},
     "recipe": {"name", "how_chosen"}, "settings": {bits, method, block_size, symmetric, accuracy_level, overrides},
     "rtn_fallback": [linear names AWQ left to RTN]   (only when there are some),
     "model": {the model facts, as the recipe schema's ModelFacts},
     "artifacts": [{"name", "format": onnx | coreml | quantized-checkpoint, "target", "path",
                    "max_length", "size_bytes", "files": [{"path", "size", "sha256"}], ...}]}

``find_artifacts`` resolves a path to the artifacts it names: an OUT folder (all of its
manifest) or one artifact folder inside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json
from phi3_export.paths import inside

MANIFEST_VERSION = 1


@dataclass
class Artifact:
    name: str
    folder: Path
    entry: dict  # the manifest's record: target, format, providers, max_length, files...
    manifest: dict

    @cached_property
    def genai_config(self) -> dict:
        """The artifact's genai_config.json, with the fields phi3-export reads checked (one-line errors)."""
        path = self.folder / "genai_config.json"
        doc = _read_json(path)
        decoder = (doc.get("model") or {}).get("decoder") if isinstance(doc.get("model"), dict) else None
        search = doc.get("search")
        ints = ("num_hidden_layers", "num_key_value_heads", "head_size")
        if (not isinstance(decoder, dict) or not all(isinstance(decoder.get(k), int) and decoder[k] > 0 for k in ints)
                or not isinstance(search, dict) or not isinstance(search.get("max_length"), int) or search["max_length"] < 1):
            raise Phi3ExportError(f"{path}: not an onnxruntime-genai decoder config (model.decoder.{', '.join(ints)} "
                                  "and search.max_length must be positive integers)")
        return doc

    @property
    def max_length(self) -> int:
        return self.genai_config["search"]["max_length"]

    def kv_cache_bytes(self, decoder_dtype: np.dtype, contexts: list[int]) -> dict:
        """KV-cache bytes of this ONNX artifact: per token, at max_length, at each of ``contexts``."""
        dec = self.genai_config["model"]["decoder"]
        per_token = 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * np.dtype(decoder_dtype).itemsize
        max_length = self.max_length
        return {"per_token": per_token, "at_max_length": per_token * max_length, "max_length": max_length,
                "at_measured": {str(c): per_token * c for c in contexts}}


def _read_json(path: Path) -> dict:
    return read_json(path)


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
    entries = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise Phi3ExportError(f"{out / 'manifest.json'}: no 'artifacts' list")
    found = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise Phi3ExportError(f"{out / 'manifest.json'}: an artifacts entry is not an object with a name")
        folder = inside(out, entry.get("path"), f"{out / 'manifest.json'}: artifact {entry['name']} path")
        if only in (None, entry["path"]):
            found.append(Artifact(entry["name"], folder, entry, manifest))
    if not found:
        raise Phi3ExportError(f"{path}: not listed in {out / 'manifest.json'}")
    for artifact in found:
        if not artifact.folder.is_dir():
            raise Phi3ExportError(f"{artifact.folder}: listed in the manifest but missing")
    return found


def weight_count(manifest: dict) -> int | None:
    """Weights in the model (from the manifest's facts): the denominator of bits per weight."""
    from phi3_export.arch import architecture
    from phi3_export.recipes.schema import ModelFacts

    try:
        facts = ModelFacts(**manifest["model"])
        return architecture(facts.architecture).weight_count(facts)
    except (KeyError, TypeError, ValueError, Phi3ExportError):
        return None


def write_manifest(staging: Path, doc: dict) -> None:
    (staging / "manifest.json").write_text(json.dumps({"schema_version": MANIFEST_VERSION, **doc}, indent=2, sort_keys=True) + "\n")


def config_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
