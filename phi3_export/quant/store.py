"""Writing a plan's tensors into the quantized checkpoint: shared by every quantizer.

RTN reads each linear from the checkpoint in row blocks; AWQ hands over weights it has
already scaled. Both store through here, one plan tensor group at a time (a layer's
attention part, then its MLP or one expert), so the writer never holds more than a group.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from phi3_export.arch.plan import Decoder, DecoderLayer, Linear, Norm
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.errors import Phi3ExportError
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.rtn import QuantizedTensor, quantize_rtn
from phi3_export.quant.settings import QuantSettings

# Rows quantized at a time: bounds the float32 working set (and its temporaries) to a few
# tens of MB whatever the tensor, e.g. Phi-3-mini's 16384 x 3072 gate_up_proj.
CHUNK_ELEMENTS = 1 << 21


def _row_step(cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, cols))


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, unless it holds a NaN or an infinity: then a one-line error naming the tensor.

    Checked as every tensor streams through (a row block, an in-memory weight, a float tensor),
    in chunks so the check's temporary stays small whatever the tensor.
    """
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        if not torch.isfinite(flat[start : start + CHUNK_ELEMENTS]).all():
            raise Phi3ExportError(f"{name}: contains NaN or Inf (the checkpoint's weights are corrupt or overflowed)")
    return tensor


def quantize_rows(weight: torch.Tensor, bits: int, settings: QuantSettings, name: str = "weight") -> Iterator[QuantizedTensor]:
    """An in-memory weight, quantized in row blocks."""
    step = _row_step(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        block = check_finite(name, weight[start : start + step])
        yield quantize_rtn(block, bits, settings.block_size, settings.symmetric)


def quantize_checkpoint_rows(ckpt: Checkpoint, name: str, bits: int, settings: QuantSettings) -> Iterator[QuantizedTensor]:
    """A checkpoint tensor, read and quantized in row blocks (never whole)."""
    rows, cols = ckpt.shape(name)
    step = _row_step(cols)
    for start in range(0, rows, step):
        block = check_finite(name, ckpt.rows(name, start, min(rows, start + step)))
        yield quantize_rtn(block, bits, settings.block_size, settings.symmetric)


def linear_precision(linear: Linear, settings: QuantSettings) -> str:
    """int4 / int8 / fp16 / fp32 of a linear's weight (a float-only linear, e.g. a router, stays float)."""
    return settings.precision(linear.role) if linear.quantize else "fp32"


def store_tensor(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, name: str, role: str, precision: str,
                 settings: QuantSettings) -> None:
    if precision in ("int4", "int8"):
        writer.add_quantized_rows(name, quantize_checkpoint_rows(ckpt, name, int(precision[3:]), settings), role)
    else:
        writer.add_float(name, check_finite(name, ckpt.tensor(name, None)), role)


def store_weights(writer: QuantizedCheckpointWriter, blocks: tuple[Linear | Norm, ...], weights: dict[str, torch.Tensor],
                  ckpt: Checkpoint, settings: QuantSettings) -> None:
    """Blocks whose (scaled) tensors are in memory: linears quantized, norms/biases/routers kept float."""
    for block in blocks:
        if isinstance(block, Norm):
            for name in block.tensors():
                writer.add_float(name, check_finite(name, weights[name]).to(ckpt.torch_dtype(name)), block.module or "norm")
            continue
        precision = linear_precision(block, settings)
        if precision in ("int4", "int8"):
            writer.add_quantized_rows(block.weight, quantize_rows(weights[block.weight], int(precision[3:]), settings, block.weight),
                                      block.role)
        else:
            writer.add_float(block.weight, check_finite(block.weight, weights[block.weight]), block.role)
        if block.bias:
            writer.add_float(block.bias, check_finite(block.bias, weights[block.bias]).to(ckpt.torch_dtype(block.bias)),
                             f"{block.role}.bias")


def store_blocks_from_checkpoint(writer: QuantizedCheckpointWriter, blocks: tuple[Linear | Norm, ...], ckpt: Checkpoint,
                                 settings: QuantSettings) -> None:
    """Blocks read straight from the checkpoint (RTN), each linear in row blocks."""
    for block in blocks:
        if isinstance(block, Norm):
            for name in block.tensors():
                store_tensor(writer, ckpt, name, block.module or "norm", "fp32", settings)
            continue
        store_tensor(writer, ckpt, block.weight, block.role, linear_precision(block, settings), settings)
        if block.bias:
            store_tensor(writer, ckpt, block.bias, f"{block.role}.bias", "fp32", settings)


def group_name(layer: DecoderLayer, group: str) -> str:
    return f"layer-{layer.index:03d}" + (f"-{group}" if group else "")


def store_globals(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, decoder: Decoder, settings: QuantSettings) -> None:
    """Final norm, embeddings and LM head: one file each, never two large tables in memory."""
    for name in decoder.final_norm.tensors():
        store_tensor(writer, ckpt, name, "final_norm", "fp32", settings)
    writer.flush("final_norm")
    # Tied: one table, stored once, serves the lookup and the LM head at the LM head's precision.
    embed_precision = settings.precision("lm_head") if decoder.tied else settings.precision("embed_tokens")
    store_tensor(writer, ckpt, decoder.embedding, "embed_tokens", embed_precision, settings)
    writer.flush("embed_tokens")
    if not decoder.tied:
        store_tensor(writer, ckpt, decoder.lm_head.weight, "lm_head", settings.precision("lm_head"), settings)
        if decoder.lm_head.bias:
            store_tensor(writer, ckpt, decoder.lm_head.bias, "lm_head.bias", "fp32", settings)
        writer.flush("lm_head")
