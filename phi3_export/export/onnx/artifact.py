"""One self-contained ONNX artifact folder: model, genai_config, tokenizer files, LICENSE.

An image + text plan (``plan.image``) adds ``embedding.onnx`` (token ids + image features ->
inputs_embeds; the decoder then takes inputs_embeds), ``vision.onnx`` (pixel_values +
image_sizes -> image features) with their ``.data`` files, and ``processor_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3_export.export.onnx.decoder import DecoderEmitter
from phi3_export.export.onnx.embedding import EmbeddingEmitter, processor_config
from phi3_export.export.onnx.genai_config import genai_config, write_genai_config
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.export.onnx.vision import VisionEmitter
from phi3_export.export.tokenizer_files import copy_tokenizer_files
from phi3_export.job import Job
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint


def export_onnx(job: Job, qckpt: QuantizedCheckpoint, target: ResolvedTarget, out: Path) -> Path:
    out.mkdir(parents=True)
    emitter = DecoderEmitter(qckpt, job.plan, target, out)
    with job.progress.task(f"onnx-{target.name}", len(job.plan.decoder.layers)) as task:
        emitter.emit(task)
    if job.plan.image is not None:
        export_image_models(job, qckpt, target, out)
    copy_tokenizer_files(job.ckpt, out)
    write_genai_config(out / "genai_config.json", genai_config(qckpt.config, job.plan, target, out / "tokenizer.json"))
    return out


def export_image_models(job: Job, qckpt: QuantizedCheckpoint, target: ResolvedTarget, out: Path) -> None:
    image, options = job.plan.image, job.recipe.export.vision
    EmbeddingEmitter(qckpt, job.plan, target, out).emit()
    vision = VisionEmitter(job.ckpt, image, options.precision, target.target.io_dtype, target.accuracy_level, out)
    with job.progress.task(f"onnx-{target.name}-vision", len(image.encoder.layers)) as task:
        vision.emit(task)
    doc = processor_config(options.num_crops, image.tokens_per_crop)
    (out / "processor_config.json").write_text(json.dumps(doc, indent=4) + "\n")
