"""Bytes an ONNX decoder artifact takes, next to the code that writes them (decoder.py).

Two levels, both used by the size budget (quant/budget.py):

- ``matmul_nbits_bytes`` / ``tensor_bytes``: the initializer bytes one plan tensor adds to
  ``model.onnx.data`` for a given ``Storage``: MatMulNBits codes padded to whole blocks
  (``rows x n_blocks x block*bits/8``), one scale per block in the target's io dtype (fp32 on
  cpu/mobile, fp16 on dml), a packed zero point per block when asymmetric (4-bit: two per
  byte, a row's odd count rounded up; 8-bit: one byte), a float tensor at the io dtype. A
  quantized embedding table (tied, or untied and quantized by a budget) is gathered by
  GatherBlockQuantized, which always takes explicit zero points. ``DecoderEmitter`` checks
  every MatMulNBits tensor it writes against ``matmul_nbits_bytes``, so the two cannot drift.
- ``predict_decoder_bytes``: the exact size of ``model.onnx`` + ``model.onnx.data`` for a
  settings (mix) and target, *before* anything is quantized: the real ``DecoderEmitter`` runs
  over a stand-in checkpoint of zeros shaped as the quantizers would write it, its data writer
  counting bytes (alignment padding included) instead of writing them, and the graph proto is
  serialised as the real export serialises it. Only one thing is data-dependent: an
  asymmetric tensor whose every zero point happens to equal MatMulNBits' default omits its
  zero-point input; the prediction counts it, so an artifact can only come out smaller.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from phi3_export.arch.plan import Linear, ModelPlan, Norm
from phi3_export.export.onnx.external_data import ExternalDataWriter
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.quant.settings import QuantSettings, Storage

DECODER_FILES = ("model.onnx", "model.onnx.data")


def matmul_nbits_bytes(shape: tuple[int, int], bits: int, block_size: int, io_dtype, zero_points: bool) -> int:
    """Bytes of one MatMulNBits weight (codes, scales, zero points if given) of ``shape`` [N, K]."""
    rows, cols = shape
    n_blocks = -(-cols // block_size)
    codes = rows * n_blocks * block_size * bits // 8
    scales = rows * n_blocks * np.dtype(io_dtype).itemsize
    zeros = rows * (n_blocks if bits == 8 else -(-n_blocks // 2)) if zero_points else 0
    return codes + scales + zeros


def tensor_bytes(shape: tuple[int, int], storage: Storage, io_dtype, *, lookup: bool = False) -> int:
    """Initializer bytes of one 2-D plan tensor stored as ``storage`` in an artifact of ``io_dtype``.

    ``lookup``: the tensor is an embedding table the graph gathers from (GatherBlockQuantized:
    explicit zero points even when symmetric). A float tensor is written at the io dtype
    whatever its checkpoint dtype ("fp16" in a mix means "kept float").
    """
    if storage.quantized:
        return matmul_nbits_bytes(shape, storage.bits, storage.block_size, io_dtype, lookup or not storage.symmetric)
    return int(np.prod(shape)) * np.dtype(io_dtype).itemsize


# ---- exact prediction of the decoder files ---------------------------------------------------


def planned_storages(plan: ModelPlan, settings: QuantSettings) -> dict[str, Storage | None]:
    """Every tensor the quantizers write, with its ``Storage`` (None: kept float), as quant/store.py decides."""
    from phi3_export.quant.store import embedding_storage, linear_storage

    decoder = plan.decoder
    out: dict[str, Storage | None] = {}
    for layer in decoder.layers:
        for _, blocks in layer.tensor_groups():
            for block in blocks:
                if isinstance(block, Norm):
                    out.update(dict.fromkeys(block.tensors()))
                    continue
                storage = linear_storage(block, settings)
                out[block.weight] = storage if storage.quantized else None
                if block.bias:
                    out[block.bias] = None
    out.update(dict.fromkeys(decoder.final_norm.tensors()))
    table = embedding_storage(decoder, settings)
    out[decoder.embedding] = table if table.quantized else None
    head: Linear = decoder.lm_head
    if not decoder.tied:
        storage = settings.storage(head.weight, "lm_head")
        out[head.weight] = storage if storage.quantized else None
        if head.bias:
            out[head.bias] = None
    return out


class _PlannedCheckpoint:
    """A stand-in for the quantized checkpoint: zeros of the shapes and storages the quantizers would write.

    Zero points are MatMulNBits' default when symmetric (as RTN writes them) and 0 otherwise, so
    an asymmetric tensor is predicted with its zero-point input.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], storages: dict[str, Storage | None], config: dict):
        self.config = config
        self._cache: dict[tuple, torch.Tensor] = {}
        self.tensors: dict[str, dict] = {}
        for name, storage in storages.items():
            shape = list(shapes[name])
            if storage is None:
                self.tensors[name] = {"kind": "float", "shape": shape, "dtype": "float32"}
            else:
                self.tensors[name] = {"kind": "quantized", "shape": shape, "bits": storage.bits,
                                      "block_size": storage.block_size, "symmetric": storage.symmetric}

    def info(self, name: str) -> dict:
        return self.tensors[name]

    def is_quantized(self, name: str) -> bool:
        return self.tensors[name]["kind"] == "quantized"

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
        """One read-only tensor per (shape, dtype, fill), reused: every layer asks for the same shapes."""
        key = (shape, dtype, fill)
        if key not in self._cache:
            self._cache[key] = torch.full(shape, fill, dtype=dtype)
        return self._cache[key]

    def packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        info = self.tensors[name]
        (rows, cols), bits, block = info["shape"], info["bits"], info["block_size"]
        n_blocks = -(-cols // block)
        zero = 2 ** (bits - 1) if info["symmetric"] else 0
        return (self._zeros((rows, -(-cols * bits // 8)), torch.uint8), self._zeros((rows, n_blocks), torch.float32),
                self._zeros((rows, n_blocks), torch.uint8, zero))

    def float(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._zeros(tuple(self.tensors[name]["shape"]), dtype)

    def float_row_blocks(self, name: str, dtype: torch.dtype, rows_per_block: int):
        rows, *rest = self.tensors[name]["shape"]
        for start in range(0, rows, rows_per_block):
            yield self._zeros((min(rows, start + rows_per_block) - start, *rest), dtype)

    def close(self) -> None:
        pass


class _NullFile:
    def write(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


class _CountingWriter(ExternalDataWriter):
    """``ExternalDataWriter`` whose bytes go nowhere: the same offsets, alignment and checks."""

    def __init__(self, path: Path):  # no super().__init__: it would open the file
        self.path = Path(path)
        self._file = _NullFile()
        self.offset = 0


def predict_decoder_bytes(shapes, plan: ModelPlan, settings: QuantSettings, target: ResolvedTarget,
                          config: dict) -> dict[str, int]:
    """{"model.onnx": bytes, "model.onnx.data": bytes} of the decoder ``export_onnx`` would write.

    ``shapes``: tensor name -> shape (a mapping, or a function such as ``Checkpoint.shape``).
    Runs the real emitter over zeros (module docstring): a few seconds at Phi-3-mini size,
    nothing written but a small model.onnx in a temporary folder.
    """
    from phi3_export.export.onnx.decoder import DecoderEmitter

    class SizingEmitter(DecoderEmitter):
        def __init__(self, *args):
            super().__init__(*args)
            self.data.close()
            self.data = _CountingWriter(self.data.path)

    storages = planned_storages(plan, settings)
    shape_of = shapes if callable(shapes) else shapes.__getitem__
    qckpt = _PlannedCheckpoint({name: tuple(shape_of(name)) for name in storages}, storages, config)
    with tempfile.TemporaryDirectory(prefix="phi3-export-sizes-") as tmp:
        emitter = SizingEmitter(qckpt, plan, target, Path(tmp))
        path = emitter.emit()
        return {"model.onnx": path.stat().st_size, "model.onnx.data": emitter.data.offset}


def decoder_file_bytes(folder: Path) -> int:
    """Bytes of an artifact's decoder files on disk (what a size budget limits)."""
    return sum((Path(folder) / name).stat().st_size for name in DECODER_FILES if (Path(folder) / name).is_file())
