"""The format-neutral quantized checkpoint: the contract between quantizers and exporters.

A folder with ``quantized.json`` and one safetensors file per group (``embed_tokens``,
``layer-000``, ...), written as each group is finished so nothing holds the model:

- a quantized weight ``NAME`` (shape [rows, cols], blocked along cols) is stored as
  ``NAME.codes``  uint8, unsigned codes; 4-bit codes packed two per byte, the even
                  column in the low nibble ([rows, ceil(cols/2)]); 8-bit one per byte
  ``NAME.scales`` float32 [rows, n_blocks]
  ``NAME.zeros``  uint8 [rows, n_blocks], explicit unsigned zero points (8 for symmetric int4)
  with ``W = (codes - zeros) * scales`` per block;
- a tensor kept in float is stored under its own name, in the checkpoint's dtype.

RTN and AWQ write it; the ONNX and Core ML exporters read the same codes from it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phi3_export.quant.rtn import QuantizedTensor

FORMAT = "phi3-export-quantized-checkpoint"
VERSION = 1
SCALE_DTYPE = "float32"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.contiguous()
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :cols].contiguous()


class QuantizedCheckpointWriter:
    def __init__(self, folder: Path, meta: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.tensors: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def add_quantized(self, name: str, q: QuantizedTensor, role: str) -> None:
        self.add_quantized_rows(name, [q], role)

    def add_quantized_rows(self, name: str, row_blocks: Iterable[QuantizedTensor], role: str) -> None:
        """A quantized tensor given as consecutive row blocks; each is packed as it arrives."""
        codes, scales, zeros, cols = [], [], [], None
        for q in row_blocks:
            codes.append(pack_codes(q.codes, q.bits))
            scales.append(q.scales.to(torch.float32))
            zeros.append(q.zeros)
            cols, bits, block, symmetric = q.shape[1], q.bits, q.block_size, q.symmetric
        self._pending[f"{name}.codes"] = torch.cat(codes) if len(codes) > 1 else codes[0].contiguous()
        del codes
        self._pending[f"{name}.scales"] = torch.cat(scales).contiguous()
        self._pending[f"{name}.zeros"] = torch.cat(zeros).contiguous()
        rows = self._pending[f"{name}.scales"].shape[0]
        self.tensors[name] = {
            "kind": "quantized", "role": role, "shape": [rows, cols], "bits": bits,
            "block_size": block, "symmetric": symmetric, "group": None,
        }

    def add_float(self, name: str, tensor: torch.Tensor, role: str) -> None:
        self._pending[name] = tensor.contiguous()
        self.tensors[name] = {"kind": "float", "role": role, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "group": None}

    def flush(self, group: str) -> None:
        """Write everything added since the last flush as one file, and forget it."""
        if not self._pending:
            return
        save_file(self._pending, str(self.folder / f"{group}.safetensors"))
        for key in self._pending:
            base = key.rsplit(".", 1)[0] if key not in self.tensors else key
            self.tensors[base]["group"] = group
        self._pending = {}

    def close(self) -> None:
        assert not self._pending, "flush() the last group before close()"
        doc = {"format": FORMAT, "version": VERSION, "scale_dtype": SCALE_DTYPE, **self.meta, "tensors": self.tensors}
        (self.folder / "quantized.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


class QuantizedCheckpoint:
    """Reads a quantized checkpoint lazily, one tensor at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        doc = json.loads((self.folder / "quantized.json").read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"{self.folder}: not a {FORMAT} v{VERSION}")
        self.meta = doc
        self.tensors: dict[str, dict[str, Any]] = doc["tensors"]
        self._handles: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    def _handle(self, group: str):
        if group not in self._handles:
            self._handles[group] = safe_open(str(self.folder / f"{group}.safetensors"), framework="pt")
        return self._handles[group]

    def _get(self, group: str, key: str) -> torch.Tensor:
        return self._handle(group).get_tensor(key)

    def info(self, name: str) -> dict[str, Any]:
        return self.tensors[name]

    def is_quantized(self, name: str) -> bool:
        return self.tensors[name]["kind"] == "quantized"

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed codes, scales, zeros) exactly as stored."""
        group = self.tensors[name]["group"]
        return self._get(group, f"{name}.codes"), self._get(group, f"{name}.scales"), self._get(group, f"{name}.zeros")

    def mapped_codes(self, name: str) -> np.ndarray:
        """``NAME.codes`` as stored (packed), as a read-only memory map of its file: no copy in memory."""
        path = self.folder / f"{self.tensors[name]['group']}.safetensors"
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(header_len))[f"{name}.codes"]
        begin, _ = entry["data_offsets"]
        return np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len + begin, shape=tuple(entry["shape"]))

    def quantized(self, name: str) -> QuantizedTensor:
        info = self.tensors[name]
        packed, scales, zeros = self.packed(name)
        codes = unpack_codes(packed, info["bits"], info["shape"][1])
        return QuantizedTensor(codes, scales, zeros, info["bits"], info["block_size"], info["symmetric"])

    def float(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._get(self.tensors[name]["group"], name).to(dtype)

    def float_row_blocks(self, name: str, dtype: torch.dtype, rows_per_block: int):
        """A float tensor as consecutive row blocks (embedding tables: 32064-200064 rows)."""
        view = self._handle(self.tensors[name]["group"]).get_slice(name)
        rows = self.tensors[name]["shape"][0]
        for start in range(0, rows, rows_per_block):
            yield view[start : min(rows, start + rows_per_block)].to(dtype)

    def weight(self, name: str) -> torch.Tensor:
        """The float weight the exporter's graph computes with (dequantized if quantized)."""
        return self.quantized(name).dequantize() if self.is_quantized(name) else self.float(name)

    def close(self) -> None:
        self._handles.clear()
