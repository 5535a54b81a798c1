"""One self-contained Core AI artifact folder: model.aimodel, its IO contract, tokenizer files, LICENSE.

``model.aimodel`` (iOS/macOS 27) holds two functions, ``prefill`` (a fixed chunk of tokens)
and ``decode`` (one token), converted by coreai-torch from one ``DecoderModule``: the
converter stores each weight constant once for both, and the app passes the same
``keyCache``/``valueCache`` arrays to either (contract.py). ``coreai_config.json`` states the
IO contract, the state shapes and the context length in one place.

The conversion itself runs in a process of its own (convert.py: how that makes the asset
byte-identical from run to run); this module checks the options up front and writes the
folder around the asset.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from phi3_export.arch.plan import Decoder
from phi3_export.errors import Phi3ExportError
from phi3_export.export.coreai.contract import (
    AIMODEL,
    CONFIG,
    DECODE,
    INPUT_IDS,
    KEY_CACHE,
    LOGITS,
    MINIMUM_OS,
    POSITION,
    PREFILL,
    VALUE_CACHE,
)
from phi3_export.export.tokenizer_files import copy_tokenizer_files
from phi3_export.job import Job
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint
from phi3_export.recipes.schema import ModelFacts, Recipe
from phi3_export.versions import tool_version

DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CoreAIOptions:
    """What one Core AI export builds (from the recipe's ``export.coreai`` and --max-length)."""

    context_length: int
    prefill_chunk: int
    precision: str  # float16 | float32: the compute dtype of the program and of its KV cache


def options(recipe: Recipe, facts: ModelFacts, requested: int | None) -> CoreAIOptions:
    """The recipe's Core AI options, checked before anything is quantized."""
    if requested is not None and requested <= 0:
        raise Phi3ExportError(f"--max-length {requested}: must be a positive number of tokens")
    settings = recipe.export.coreai
    length = settings.context_length if requested is None else requested
    limit = facts.context_length if isinstance(facts.context_length, int) else None
    if limit is not None and length > limit:
        raise Phi3ExportError(f"Core AI context length {length} exceeds the model's context length {limit}")
    if settings.prefill_chunk > length:
        raise Phi3ExportError(f"recipe {recipe.name}: export.coreai.prefill_chunk {settings.prefill_chunk} "
                              f"exceeds the context length {length}")
    return CoreAIOptions(length, settings.prefill_chunk, settings.precision)


@dataclass(frozen=True)
class ConversionJob:
    """What the conversion process needs (JSON-serialisable: it crosses a process boundary)."""

    checkpoint: str  # the source checkpoint folder: config.json gives the model plan
    quantized: str  # the quantized checkpoint folder: the codes
    asset: str  # where model.aimodel goes
    context_length: int
    prefill_chunk: int
    precision: str
    description: str


def cache_shape(decoder: Decoder, context_length: int) -> list[int]:
    return [len(decoder.layers), 1, decoder.kv_heads, context_length, decoder.head_dim]


def export_coreai(job: Job, qckpt: QuantizedCheckpoint, out: Path, opts: CoreAIOptions) -> Path:
    from phi3_export.export.coreai.convert import run_conversion

    decoder = job.plan.decoder
    out.mkdir(parents=True)
    job.progress.message("coreai: converting with coreai-torch and writing the asset (a separate process)")
    run_conversion(ConversionJob(
        checkpoint=str(job.ckpt.folder), quantized=str(qckpt.folder), asset=str(out / AIMODEL),
        context_length=opts.context_length, prefill_chunk=opts.prefill_chunk, precision=opts.precision,
        description=f"{job.recipe.description or job.recipe.name}: {PREFILL}/{DECODE} decoder sharing its KV-cache state",
    ))
    copy_tokenizer_files(job.ckpt, out)
    shutil.copyfile(job.ckpt.folder / "config.json", out / "config.json")
    if (job.ckpt.folder / "generation_config.json").is_file():
        shutil.copyfile(job.ckpt.folder / "generation_config.json", out / "generation_config.json")
    cache = cache_shape(decoder, opts.context_length)
    element = torch.tensor([], dtype=DTYPES[opts.precision]).element_size()
    (out / CONFIG).write_text(json.dumps({
        "asset": AIMODEL,
        "minimum_os": MINIMUM_OS,
        "context_length": opts.context_length,
        "precision": opts.precision,
        "functions": {
            PREFILL: {"inputs": {INPUT_IDS: {"dtype": "int32", "shape": [1, opts.prefill_chunk]},
                                 POSITION: {"dtype": "int32", "shape": [1]}},
                      "outputs": {LOGITS: {"dtype": "float32", "shape": [1, opts.prefill_chunk, decoder.vocab]}},
                      "meaning": "pad a shorter prompt at the end and read the logits of its last real token; "
                                 f"position + {opts.prefill_chunk} must not exceed the context length "
                                 "(feed a prompt's last tokens to decode one by one)"},
            DECODE: {"inputs": {INPUT_IDS: {"dtype": "int32", "shape": [1, 1]}, POSITION: {"dtype": "int32", "shape": [1]}},
                     "outputs": {LOGITS: {"dtype": "float32", "shape": [1, 1, decoder.vocab]}}},
        },
        "position": "tokens the cache already holds; a function writes its keys and values at position..position+q-1",
        "states": {name: {"dtype": opts.precision, "shape": cache} for name in (KEY_CACHE, VALUE_CACHE)},
        "kv_cache_bytes": 2 * element * int(torch.Size(cache).numel()),
        "weights": "int blockwise (constexpr_blockwise_shift_scale): codes and zero points as in the ONNX artifact, "
                   "scales float16; stored once for both functions",
        "tool_version": tool_version(),
        "quantization": {**job.settings.as_dict(), "tag": job.settings.tag},
    }, indent=2) + "\n")
    return out
