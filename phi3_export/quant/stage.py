"""The quantize stage: checkpoint -> format-neutral quantized checkpoint, one layer at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from phi3_export.arch.base import Architecture
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.progress import Progress
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.rtn import QuantizedTensor, quantize_rtn
from phi3_export.quant.settings import QuantSettings
from phi3_export.recipes.schema import ModelFacts

# Rows quantized at a time: bounds the float32 working set (and its temporaries) to a few
# tens of MB whatever the tensor, e.g. Phi-3-mini's 16384 x 3072 gate_up_proj.
CHUNK_ELEMENTS = 1 << 21


def quantize_rows(ckpt: Checkpoint, name: str, bits: int, settings: QuantSettings) -> Iterator[QuantizedTensor]:
    rows, cols = ckpt.shape(name)
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        yield quantize_rtn(ckpt.rows(name, start, min(rows, start + step)), bits, settings.block_size, settings.symmetric)


def _store(writer: QuantizedCheckpointWriter, ckpt: Checkpoint, name: str, role: str, precision: str, settings: QuantSettings) -> None:
    if precision in ("int4", "int8"):
        writer.add_quantized_rows(name, quantize_rows(ckpt, name, int(precision[3:]), settings), role)
    else:
        writer.add_float(name, ckpt.tensor(name, None), role)


def quantize_checkpoint(
    ckpt: Checkpoint, arch: type[Architecture], facts: ModelFacts, settings: QuantSettings, out: Path,
    progress: Progress,
) -> Path:
    if settings.method != "rtn":
        from phi3_export.errors import NotSupportedYet

        raise NotSupportedYet(f"not supported yet: --method {settings.method} (RTN is available)")
    meta = {"architecture": facts.architecture, "config": ckpt.config, "settings": settings.as_dict()}
    writer = QuantizedCheckpointWriter(out, meta)
    tied = facts.tie_word_embeddings is True
    with progress.task("quantize", facts.num_layers + 1) as task:
        for i in range(facts.num_layers):
            for role in arch.layer_norms:
                writer.add_float(arch.layer_tensor(role, i), ckpt.tensor(arch.layer_tensor(role, i), None), role)
            for role in arch.layer_linears:
                _store(writer, ckpt, arch.layer_tensor(role, i), role, settings.precision(role), settings)
            writer.flush(f"layer-{i:03d}")
            task.advance(f"layer {i}")
        writer.add_float(arch.final_norm, ckpt.tensor(arch.final_norm, None), "final_norm")
        writer.flush("final_norm")
        # Tied: one table, stored once, serves the lookup and the LM head at the LM head's precision.
        embed_precision = settings.precision("lm_head") if tied else settings.precision("embed_tokens")
        _store(writer, ckpt, arch.embed, "embed_tokens", embed_precision, settings)
        writer.flush("embed_tokens")  # the two largest tensors: one file each, never both in memory
        if not tied:
            _store(writer, ckpt, arch.lm_head, "lm_head", settings.precision("lm_head"), settings)
            writer.flush("lm_head")
        task.advance("embeddings")
    writer.close()
    return out
