"""Round-to-nearest block quantization, model-agnostic.

A weight ``W[rows, cols]`` is cut into blocks of ``block_size`` consecutive columns (the
input dimension, which MatMulNBits and Core ML's blockwise ops both block along). Each
block gets a scale ``s`` and an unsigned zero point ``z``; codes ``q`` are unsigned, and

    W ≈ (q - z) * s

Symmetric: ``z = 2**(bits-1)`` (8 for int4) and ``s = signed_absmax / -2**(bits-1)``, so the
largest-magnitude weight lands exactly on -8 (int4) and all 16 levels are used.
Asymmetric: the block's [min, max] (widened to contain 0) maps onto [0, 2**bits - 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [rows, cols], one code per element (0 .. 2**bits-1)
    scales: torch.Tensor  # float32 [rows, n_blocks]
    zeros: torch.Tensor  # uint8 [rows, n_blocks]
    bits: int
    block_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.block_size)


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    if cols % block_size:
        # Pad the last block with zeros; the padding is dropped again when unpacking.
        weight = torch.nn.functional.pad(weight, (0, block_size - cols % block_size))
    return weight.reshape(rows, -1, block_size)


def quantize_rtn(weight: torch.Tensor, bits: int, block_size: int, symmetric: bool) -> QuantizedTensor:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    w = _blocks(weight.to(torch.float32), block_size)
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        wmax = w.amax(dim=-1)
        wmin = w.amin(dim=-1)
        signed_absmax = torch.where(wmax.abs() >= wmin.abs(), wmax, wmin)
        scales = signed_absmax / -half
        zeros = torch.full_like(scales, half)
    else:
        wmin = w.amin(dim=-1).clamp(max=0)
        wmax = w.amax(dim=-1).clamp(min=0)
        scales = (wmax - wmin) / levels
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = torch.round(-wmin / safe).clamp(0, levels)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round(w / safe[..., None]) + zeros[..., None]
    codes = codes.clamp(0, levels).to(torch.uint8).reshape(rows, -1)[:, :cols]
    return QuantizedTensor(
        codes=codes.contiguous(), scales=scales.contiguous(), zeros=zeros.to(torch.uint8).contiguous(),
        bits=bits, block_size=block_size, symmetric=symmetric,
    )


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, cols = codes.shape
    q = _blocks(codes.to(torch.float32), block_size)
    w = (q - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(rows, -1)[:, :cols]
