"""One self-contained ONNX artifact folder: model, genai_config, tokenizer files, LICENSE."""

from __future__ import annotations

from pathlib import Path

from phi3_export.export.onnx.decoder import DecoderEmitter
from phi3_export.export.onnx.genai_config import genai_config, write_genai_config
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.export.tokenizer_files import copy_tokenizer_files
from phi3_export.job import Job
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint


def export_onnx(job: Job, qckpt: QuantizedCheckpoint, target: ResolvedTarget, out: Path) -> Path:
    out.mkdir(parents=True)
    emitter = DecoderEmitter(qckpt, job.plan, target, out)
    with job.progress.task(f"onnx-{target.name}", len(job.plan.decoder.layers)) as task:
        emitter.emit(task)
    copy_tokenizer_files(job.ckpt, out)
    write_genai_config(out / "genai_config.json", genai_config(qckpt.config, job.plan, target, out / "tokenizer.json"))
    return out
