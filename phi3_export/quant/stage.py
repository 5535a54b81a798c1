"""The quantize stage: checkpoint -> format-neutral quantized checkpoint, one layer at a time.

Methods are looked up in ``QUANTIZERS`` (no branching on method names): RTN here, AWQ in
quant/awq.py. Both write the same quantized checkpoint, which every exporter reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi3_export.arch.base import Architecture
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.memory import release_freed_memory
from phi3_export.progress import Progress
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.rtn import QuantizedTensor, quantize_rtn
from phi3_export.quant.settings import QuantSettings
from phi3_export.recipes.schema import ModelFacts

# Rows quantized at a time: bounds the float32 working set (and its temporaries) to a few
# tens of MB whatever the tensor, e.g. Phi-3-mini's 16384 x 3072 gate_up_proj.
CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class QuantizeRequest:
    """Everything a quantizer may need beyond the settings (calibration for AWQ)."""

    calibration_text: str = ""
    awq: object = None  # quant.awq.AwqOptions
    resume: bool = False


def _row_step(cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // cols)


def quantize_rows(weight: torch.Tensor, bits: int, settings: QuantSettings) -> Iterator[QuantizedTensor]:
    """An in-memory weight, quantized in row blocks."""
    step = _row_step(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        yield quantize_rtn(weight[start : start + step], bits, settings.block_size, settings.symmetric)


def quantize_checkpoint_rows(ckpt: Checkpoint, name: str, bits: int, settings: QuantSettings) -> Iterator[QuantizedTensor]:
    """A checkpoint tensor, read and quantized in row blocks (never whole)."""
    rows, cols = ckpt.shape(name)
    step = _row_step(cols)
    for start in range(0, rows, step):
        yield quantize_rtn(ckpt.rows(name, start, min(rows, start + step)), bits, settings.block_size, settings.symmetric)


def store_tensor(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, name: str, role: str, precision: str,
                 settings: QuantSettings) -> None:
    if precision in ("int4", "int8"):
        writer.add_quantized_rows(name, quantize_checkpoint_rows(ckpt, name, int(precision[3:]), settings), role)
    else:
        writer.add_float(name, ckpt.tensor(name, None), role)


def store_globals(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, arch: type[Architecture], facts: ModelFacts,
                  settings: QuantSettings) -> None:
    """Final norm, embeddings and LM head: one file each, never two large tables in memory."""
    store_tensor(writer, ckpt, arch.final_norm, "final_norm", "fp32", settings)
    writer.flush("final_norm")
    tied = facts.tie_word_embeddings is True
    # Tied: one table, stored once, serves the lookup and the LM head at the LM head's precision.
    embed_precision = settings.precision("lm_head") if tied else settings.precision("embed_tokens")
    store_tensor(writer, ckpt, arch.embed, "embed_tokens", embed_precision, settings)
    writer.flush("embed_tokens")
    if not tied:
        store_tensor(writer, ckpt, arch.lm_head, "lm_head", settings.precision("lm_head"), settings)
        writer.flush("lm_head")


def rtn_quantize_checkpoint(
    ckpt: Checkpoint, arch: type[Architecture], facts: ModelFacts, settings: QuantSettings, out: Path,
    progress: Progress, request: QuantizeRequest,
) -> Path:
    meta = {"architecture": facts.architecture, "config": ckpt.config, "settings": settings.as_dict()}
    writer = QuantizedCheckpointWriter(out, meta)
    with progress.task("quantize", facts.num_layers + 1) as task:
        for i in range(facts.num_layers):
            for role in arch.layer_norms:
                store_tensor(writer, ckpt, arch.layer_tensor(role, i), role, "fp32", settings)
            for role in arch.layer_linears:
                store_tensor(writer, ckpt, arch.layer_tensor(role, i), role, settings.precision(role), settings)
            writer.flush(f"layer-{i:03d}")
            ckpt.close()  # unmap the shards read so far: their pages otherwise stay in this process's RSS
            release_freed_memory()
            task.advance(f"layer {i}")
        store_globals(writer, ckpt, arch, facts, settings)
        task.advance("embeddings")
    writer.close()
    return out


@dataclass(frozen=True)
class Quantizer:
    run: Callable[..., Path]
    resumable: bool = False
    needs_calibration: bool = False
    notes: list[str] = field(default_factory=list)


def _awq(*args, **kwargs) -> Path:
    from phi3_export.quant.awq import awq_quantize_checkpoint

    return awq_quantize_checkpoint(*args, **kwargs)


QUANTIZERS: dict[str, Quantizer] = {
    "rtn": Quantizer(rtn_quantize_checkpoint),
    "awq": Quantizer(_awq, resumable=True, needs_calibration=True),
}
