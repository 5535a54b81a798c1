"""A local Hugging Face checkpoint, read lazily one tensor at a time.

Only config.json, safetensors shards (with or without an index) and tokenizer files are
read. Pickle formats (.bin/.pt/.pth/.ckpt) are refused and nothing in the folder is ever
executed. Every shard's header is checked against the file size up front, so a
truncated download fails before any output is written.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from phi3_export.errors import Phi3ExportError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise Phi3ExportError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def _tensor_index(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Phi3ExportError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise Phi3ExportError(f"{path}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Phi3ExportError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + end > size:
        raise Phi3ExportError(
            f"{path}: truncated safetensors file: header needs {8 + header_len + end} bytes, file has {size}"
        )
    return header


class Checkpoint:
    """A checkpoint folder: its config, tokenizer files and tensors (loaded on demand)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise Phi3ExportError(f"{self.folder}: checkpoint folder not found")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise Phi3ExportError(f"{config_path}: missing config.json (not a Hugging Face checkpoint folder)")
        # An "auto_map" (remote modelling code) is ignored, never run: the registry's
        # declarative module and the config's own fields describe the model.
        self.config = _read_json(config_path)
        self._shards = self._find_shards()
        self._where: dict[str, Path] = {}
        self._headers: dict[str, dict[str, Any]] = {}
        for shard in self._shards:
            for name, info in _tensor_index(shard).items():
                self._where[name] = shard
                self._headers[name] = info
        self._open: dict[Path, Any] = {}

    def _find_shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            shards = sorted({self.folder / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise Phi3ExportError(f"{index}: lists shard {missing[0]} which is missing")
            return shards
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            return shards
        pickles = [p.name for p in sorted(self.folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise Phi3ExportError(
                f"{self.folder / pickles[0]}: pickle checkpoints are refused (loading them can run code); "
                "convert to safetensors first"
            )
        raise Phi3ExportError(f"{self.folder}: no *.safetensors weights found")

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._require(name)["shape"])

    def dtype_name(self, name: str) -> str:
        return self._require(name)["dtype"]

    def torch_dtype(self, name: str) -> torch.dtype:
        table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        return table.get(self.dtype_name(name), torch.float32)

    def _require(self, name: str) -> dict[str, Any]:
        try:
            return self._headers[name]
        except KeyError:
            raise Phi3ExportError(f"{self.folder}: tensor {name!r} not found in the checkpoint") from None

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One tensor, copied out of the mapped shard (converted to ``dtype`` unless None)."""
        self._require(name)
        shard = self._where[name]
        handle = self._open.get(shard)
        if handle is None:
            handle = self._open[shard] = safe_open(str(shard), framework="pt")
        tensor = handle.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor, without reading the rest."""
        self._require(name)
        shard = self._where[name]
        handle = self._open.get(shard)
        if handle is None:
            handle = self._open[shard] = safe_open(str(shard), framework="pt")
        return handle.get_slice(name)[start:stop].to(dtype)

    def gather_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) of a 2-D table, fp32, reading only the distinct rows needed."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.stack([self.rows(name, int(t), int(t) + 1)[0] for t in unique])
        return rows[inverse]

    def close(self) -> None:
        """Drop the open shards: unmaps them, so pages read so far leave this process's RSS."""
        self._open.clear()

    @cached_property
    def tokenizer_kind(self) -> str:
        """Byte-level BPE (Phi-4-mini, Phi-3-small) or Llama sentencepiece-style BPE."""
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            return "llama-sentencepiece" if (self.folder / "tokenizer.model").is_file() else "unknown"
        spec = _read_json(path)
        text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
        return "byte-bpe" if "ByteLevel" in text else "llama-sentencepiece"

    def tokenizer_files(self) -> Iterator[Path]:
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                yield self.folder / name

    def license_file(self) -> Path | None:
        return next((self.folder / n for n in LICENSE_FILES if (self.folder / n).is_file()), None)

    def fixture_recipe(self) -> str | None:
        """The recipe a test fixture scales down (recorded by `phi3-export fixture`)."""
        return (self.config.get("phi3_export_fixture") or {}).get("recipe")
