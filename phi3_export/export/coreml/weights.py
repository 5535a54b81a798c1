"""Weights for the Core ML program, taken from the quantized checkpoint and kept on disk.

coremltools keeps every constant of a MIL program in memory until the program is
serialised, and wants sub-byte codes unpacked (one uint4 per byte). Held in RAM that
would be 3.8 GB for Phi-3-mini's codes alone. So each tensor is unpacked, a row block at a
time, into a scratch ``.npy`` file and handed to the builder as a read-only memory map:
the program references file-backed pages, and anonymous memory stays at one row block.

Codes and zero points are the checkpoint's own (so the ONNX artifact's MatMulNBits holds
the same values); scales are stored as float16, the precision Core ML's fp16 program
computes in (float32 in the checkpoint). A fused linear whose parts are not contiguous rows
(Phi-3-small's head-group-major qkv, GEGLU's interleaved gate/linear) is read with its rows
in the plan's ``row_order()``: codes, scales and zero points move with their row, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phi3_export.errors import Phi3ExportError
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, unpack_codes

ROW_BLOCK_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class BlockwiseWeight:
    """Inputs of ``constexpr_blockwise_shift_scale``: W = scale * (data - offset), per block."""

    data: np.ndarray  # [rows, cols] uint4/uint8 codes, memory-mapped
    scale: np.ndarray  # [rows, cols / block] float16
    offset: np.ndarray  # [rows, cols / block] uint4/uint8 zero points
    bits: int


class WeightStore:
    def __init__(self, qckpt: QuantizedCheckpoint, scratch: Path):
        self.qckpt = qckpt
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)

    def _file(self, name: str, suffix: str) -> Path:
        return self.scratch / f"{name}.{suffix}.npy"

    def _mapped(self, path: Path, shape: tuple[int, ...], dtype, blocks) -> np.ndarray:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        row = 0
        for block in blocks:
            out[row : row + block.shape[0]] = block
            row += block.shape[0]
        out.flush()
        del out
        return np.load(path, mmap_mode="r")

    def blockwise(self, name: str, order: list[int] | None = None) -> BlockwiseWeight:
        """The weight's codes, scales and zero points; with ``order``, its rows in that order."""
        from phi3_export.export.coreml.ct import coremltools

        coremltools()
        from coremltools.converters.mil.mil import types

        info = self.qckpt.info(name)
        bits, block = info["bits"], info["block_size"]
        rows, cols = info["shape"]
        if cols % block:
            raise Phi3ExportError(f"{name}: {cols} columns is not a whole number of {block}-weight blocks, "
                                  "which constexpr_blockwise_shift_scale needs")
        packed, scales, zeros = self.qckpt.packed(name)
        if order is not None:
            index = torch.tensor(order)
            packed, scales, zeros = packed[index], scales[index], zeros[index]
        step = max(1, ROW_BLOCK_WEIGHTS // cols)
        codes = self._mapped(self._file(name, "data"), (rows, cols), np.uint8,
                             (unpack_codes(packed[r : r + step], bits, cols).numpy() for r in range(0, rows, step)))
        sub_byte = types.np_uint4_dtype if bits == 4 else np.dtype(np.uint8)
        scale = self._mapped(self._file(name, "scale"), tuple(scales.shape), np.float16,
                             (scales[r : r + step].numpy().astype(np.float16) for r in range(0, rows, step)))
        offset = self._mapped(self._file(name, "offset"), tuple(zeros.shape), np.uint8,
                              (zeros[r : r + step].numpy() for r in range(0, rows, step)))
        del packed, scales, zeros
        return BlockwiseWeight(codes.view(sub_byte), scale, offset.view(sub_byte), bits)

    def float16(self, name: str, order: list[int] | None = None) -> np.ndarray:
        """A float tensor as float16; with ``order``, its rows in that order (read whole: a fused
        linear's bias, or its weight when a precision override keeps it float)."""
        shape = tuple(self.qckpt.info(name)["shape"])
        if order is not None:
            return self._mapped(self._file(name, "fp16"), shape, np.float16, [self.qckpt.float(name, torch.float16)[order].numpy()])
        rows_per_block = max(1, ROW_BLOCK_WEIGHTS // max(1, int(np.prod(shape[1:]))))
        blocks = (b.numpy() for b in self.qckpt.float_row_blocks(name, torch.float16, rows_per_block))
        return self._mapped(self._file(name, "fp16"), shape, np.float16, blocks)
