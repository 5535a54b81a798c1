"""One self-contained ONNX artifact folder: model, genai_config, tokenizer files, LICENSE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phi3_export.arch.base import Architecture
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.export.onnx.decoder import DecoderEmitter, DecoderShape
from phi3_export.export.onnx.genai_config import genai_config, write_genai_config
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.progress import Progress
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint
from phi3_export.recipes.schema import ModelFacts


def copy_tokenizer_files(ckpt: Checkpoint, out: Path) -> None:
    for path in ckpt.tokenizer_files():
        shutil.copyfile(path, out / path.name)
    # transformers 5 keeps the chat template in chat_template.jinja; onnxruntime-genai
    # reads it from tokenizer_config.json, so put it there too.
    template, config = out / "chat_template.jinja", out / "tokenizer_config.json"
    if template.is_file() and config.is_file():
        doc = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" not in doc:
            doc["chat_template"] = template.read_text(encoding="utf-8")
            config.write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    license_file = ckpt.license_file()
    if license_file is not None:
        shutil.copyfile(license_file, out / license_file.name)


def export_onnx(
    qckpt: QuantizedCheckpoint, ckpt: Checkpoint, arch: type[Architecture], facts: ModelFacts,
    target: ResolvedTarget, out: Path, progress: Progress,
) -> Path:
    out.mkdir(parents=True)
    shape = DecoderShape.from_config(qckpt.config, facts)
    emitter = DecoderEmitter(qckpt, arch, shape, arch.rope_tables(qckpt.config), target, out)
    with progress.task(f"onnx-{target.name}", shape.layers) as task:
        emitter.emit(task)
    copy_tokenizer_files(ckpt, out)
    write_genai_config(out / "genai_config.json", genai_config(qckpt.config, shape, target, out / "tokenizer.json"))
    return out
