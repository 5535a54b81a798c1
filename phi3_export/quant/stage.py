"""The quantize stage: checkpoint -> format-neutral quantized checkpoint, one layer at a time.

Methods are looked up in ``QUANTIZERS`` (no branching on method names): RTN here, AWQ in
quant/awq.py, GPTQ and AWQ-then-GPTQ in quant/gptq.py (the calibrated ones share
quant/calibrate.py's layer loop). All walk the model plan and write the same quantized
checkpoint (quant/store.py), which every exporter reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi3_export.checkpoint.stream import stream_layers
from phi3_export.job import Job
from phi3_export.quant.awq import awq_quantize_checkpoint
from phi3_export.quant.gptq import awq_gptq_quantize_checkpoint, gptq_quantize_checkpoint
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.request import QuantizeRequest
from phi3_export.quant.store import group_name, store_blocks_from_checkpoint, store_globals


def rtn_quantize_checkpoint(job: Job, out: Path, request: QuantizeRequest) -> Path:
    ckpt, settings, decoder = job.ckpt, job.settings, job.plan.decoder
    meta = {"architecture": job.facts.architecture, "config": ckpt.config, "settings": settings.as_dict()}
    writer = QuantizedCheckpointWriter(out, meta)
    with job.progress.task("quantize", len(decoder.layers) + 1) as task:
        for layer in stream_layers(ckpt, decoder.layers, task):
            for group, blocks in layer.tensor_groups():
                store_blocks_from_checkpoint(writer, blocks, ckpt, settings)
                writer.flush(group_name(layer, group))
        store_globals(writer, ckpt, decoder, settings)
        task.advance("embeddings")
    writer.close()
    return out


@dataclass(frozen=True)
class Quantizer:
    run: Callable[[Job, Path, QuantizeRequest], Path]
    resumable: bool = False  # keeps finished layers in a work folder that outlives an interrupted run
    needs_calibration: bool = False


QUANTIZERS: dict[str, Quantizer] = {
    "rtn": Quantizer(rtn_quantize_checkpoint),
    "awq": Quantizer(awq_quantize_checkpoint, resumable=True, needs_calibration=True),
    "gptq": Quantizer(gptq_quantize_checkpoint, resumable=True, needs_calibration=True),
    "awq-gptq": Quantizer(awq_gptq_quantize_checkpoint, resumable=True, needs_calibration=True),
}
