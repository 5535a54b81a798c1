"""Weights of the Core AI module, from the quantized checkpoint, never materialised as floats.

A quantized linear becomes coreai-torch's ``WeightDequantizeModule``: the op
``coreai::constexpr_blockwise_shift_scale`` computes W = scale * (codes - zero point) per
block, with the checkpoint's own codes and zero points (so the asset holds the ONNX
MatMulNBits bytes) and its scales in float16 (the precision Core ML's program uses too).
Float tensors (norms, an untied embedding table) are constants in the compute dtype.

Memory: torch.export traces the module with its codes on the meta device (shapes only).
Once coreai-torch has staged an exported program, ``attach_codes`` replaces each code
buffer in it by a sub-byte tensor whose packed bytes are a read-only memory map of the
quantized checkpoint's file. Our 4-bit packing (even column in the low nibble, rows
contiguous, ``quant/qcheckpoint.py``) is the one coreai-torch's ``UintxTensor`` uses, so the
bytes reach the asset unchanged and the converter's own constant is their only copy in
anonymous memory. (coreai-torch would otherwise pack an unpacked uint8 copy of every
weight first: one more byte per weight held until the asset is written.) ``UintxTensor``
and ``WeightDequantizeModule`` are private to coreai-torch: the version is pinned (lib.py).
"""

from __future__ import annotations

import warnings

import torch

from phi3_export.quant.qcheckpoint import QuantizedCheckpoint

CODES_BUFFER = "quantized_data"


class FloatWeight(torch.nn.Module):
    """A float tensor of the checkpoint as a constant in the compute dtype."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


class WeightSource:
    """Makes the module's weight modules and, after tracing, gives their codes real bytes."""

    def __init__(self, qckpt: QuantizedCheckpoint, dtype: torch.dtype):
        self.qckpt, self.dtype = qckpt, dtype
        # module path of each code buffer -> the checkpoint tensor it holds
        self.codes: dict[str, str] = {}

    def module(self, name: str, path: str) -> torch.nn.Module:
        """The weight ``name`` as a module whose forward() returns it; ``path`` is where it is attached."""
        if not self.qckpt.is_quantized(name):
            return FloatWeight(self.qckpt.float(name, self.dtype))
        from coreai_torch._compression.custom_layers import WeightDequantizeModule

        info = self.qckpt.info(name)
        _, scales, zeros = self.qckpt.packed(name)
        codes = torch.empty(tuple(info["shape"]), dtype=torch.uint8, device="meta")
        self.codes[f"{path}.{CODES_BUFFER}"] = name
        return WeightDequantizeModule(codes, scales.to(torch.float16), zeros.clone(),
                                      input_dtype=torch.uint4 if info["bits"] == 4 else torch.uint8)

    def attach_codes(self, program) -> None:
        """Replace the meta code buffers of an exported (and staged) program by the checkpoint's bytes."""
        from coreai_torch._compression._intx import UintxTensor

        targets = {spec.target for spec in program.graph_signature.input_specs if spec.target}
        with warnings.catch_warnings():
            # The memory map is read-only and stays so: the converter only reads it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for target, name in self.codes.items():
                if target not in targets:
                    continue
                info = self.qckpt.info(name)
                packed = torch.from_numpy(self.qckpt.mapped_codes(name)).view(-1)
                shape = torch.Size(info["shape"])
                program.state_dict[target] = UintxTensor(packed, shape, 4) if info["bits"] == 4 else packed.view(shape)
