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
from phi3_export.quant.settings import QuantSettings, Storage

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


def quantize_rows(weight: torch.Tensor, storage: Storage, name: str = "weight") -> Iterator[QuantizedTensor]:
    """An in-memory weight, quantized in row blocks."""
    step = _row_step(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        block = check_finite(name, weight[start : start + step])
        yield quantize_rtn(block, storage.bits, storage.block_size, storage.symmetric)


def quantize_checkpoint_rows(ckpt: Checkpoint, name: str, storage: Storage) -> Iterator[QuantizedTensor]:
    """A checkpoint tensor, read and quantized in row blocks (never whole)."""
    rows, cols = ckpt.shape(name)
    step = _row_step(cols)
    for start in range(0, rows, step):
        block = check_finite(name, ckpt.rows(name, start, min(rows, start + step)))
        yield quantize_rtn(block, storage.bits, storage.block_size, storage.symmetric)


FLOAT = Storage("fp32")


def linear_storage(linear: Linear, settings: QuantSettings) -> Storage:
    """How a linear's weight is stored (a float-only linear, e.g. a router, stays float)."""
    return settings.storage(linear.weight, linear.role) if linear.quantize else FLOAT


def store_tensor(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, name: str, role: str, storage: Storage) -> None:
    if storage.quantized:
        writer.add_quantized_rows(name, quantize_checkpoint_rows(ckpt, name, storage), role)
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
        storage = linear_storage(block, settings)
        if storage.quantized:
            writer.add_quantized_rows(block.weight, quantize_rows(weights[block.weight], storage, block.weight), block.role)
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
                store_tensor(writer, ckpt, name, block.module or "norm", FLOAT)
            continue
        store_tensor(writer, ckpt, block.weight, block.role, linear_storage(block, settings))
        if block.bias:
            store_tensor(writer, ckpt, block.bias, f"{block.role}.bias", FLOAT)


def group_name(layer: DecoderLayer, group: str) -> str:
    return f"layer-{layer.index:03d}" + (f"-{group}" if group else "")


def embedding_storage(decoder: Decoder, settings: QuantSettings) -> Storage:
    """Tied: one table, stored once, serves the lookup and the LM head at the LM head's precision."""
    return settings.storage(decoder.embedding, "lm_head" if decoder.tied else "embed_tokens")


def store_globals(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, decoder: Decoder, settings: QuantSettings) -> None:
    """Final norm, embeddings and LM head: one file each, never two large tables in memory."""
    for name in decoder.final_norm.tensors():
        store_tensor(writer, ckpt, name, "final_norm", FLOAT)
    writer.flush("final_norm")
    store_tensor(writer, ckpt, decoder.embedding, "embed_tokens", embedding_storage(decoder, settings))
    writer.flush("embed_tokens")
    if not decoder.tied:
        store_tensor(writer, ckpt, decoder.lm_head.weight, "lm_head", settings.storage(decoder.lm_head.weight, "lm_head"))
        if decoder.lm_head.bias:
            store_tensor(writer, ckpt, decoder.lm_head.bias, "lm_head.bias", FLOAT)
        writer.flush("lm_head")


def quantized_row_blocks(name: str, q: QuantizedTensor) -> Iterator[QuantizedTensor]:
    """Codes a quantizer already chose (GPTQ), handed to the writer in row blocks as RTN's are;
    their scales are checked finite (a NaN calibration input would otherwise pass silently)."""
    step = _row_step(q.shape[1])
    for start in range(0, q.shape[0], step):
        rows = slice(start, start + step)
        yield QuantizedTensor(q.codes[rows], check_finite(name, q.scales[rows]), q.zeros[rows], q.bits, q.block_size,
                              q.symmetric)


def store_layer_weights(writer: QuantizedCheckpointWriter, blocks: tuple[Linear | Norm, ...], weights: dict[str, torch.Tensor],
                        quantized: dict[str, QuantizedTensor], ckpt: Checkpoint, settings: QuantSettings) -> None:
    """``store_weights``, except that linears named in ``quantized`` are stored with those codes
    (which must be at the linear's own storage: its bits, block size and symmetry)."""
    for block in blocks:
        if isinstance(block, Norm) or block.weight not in quantized:
            store_weights(writer, (block,), weights, ckpt, settings)
            continue
        q, storage = quantized[block.weight], linear_storage(block, settings)
        if (q.bits, q.block_size, q.symmetric) != (storage.bits, storage.block_size, storage.symmetric) or q.shape != block.shape:
            raise ValueError(f"{block.weight}: codes at {q.bits} bits, block {q.block_size}, shape {q.shape} do not match "
                             f"its storage {storage.label}, shape {block.shape}")
        writer.add_quantized_rows(block.weight, quantized_row_blocks(block.weight, q), block.role)
        if block.bias:
            writer.add_float(block.bias, check_finite(block.bias, weights[block.bias]).to(ckpt.torch_dtype(block.bias)),
                             f"{block.role}.bias")
