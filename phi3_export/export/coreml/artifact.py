"""One self-contained Core ML artifact folder: model.mlpackage, config and tokenizer files, LICENSE.

The folder is what swift-transformers' ``LanguageModel`` loads offline: the package (compiled
by Xcode into ``.mlmodelc``), ``config.json`` (model type, BOS/EOS) and the tokenizer files.
``coreml_config.json`` states the IO contract and the quantization in one place.

Deterministic: coremltools gives each package item a random UUID in ``Manifest.json`` and
stamps the conversion date into the model metadata; both are replaced by values derived
from the content, and the model spec is re-serialised with deterministic map order.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.export.coreml.contract import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, MINIMUM_OS, MLPACKAGE, VALUE_CACHE
from phi3_export.export.coreml.ct import coremltools, quiet_passes
from phi3_export.export.coreml.weights import WeightStore
from phi3_export.export.tokenizer_files import copy_tokenizer_files
from phi3_export.job import Job
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint
from phi3_export.recipes.schema import ModelFacts, Recipe
from phi3_export.versions import tool_version

SPEC = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
# Item identifiers in Manifest.json are UUIDs; derive them from the item path.
_MANIFEST_NAMESPACE = uuid.UUID("6f0b1f3e-6d1c-4b8e-9a57-3c1f2d7e5a10")
_DROPPED_METADATA = ("com.github.apple.coremltools.conversion_date",)


def context_length(recipe: Recipe, facts: ModelFacts, requested: int | None) -> int:
    if recipe.export.coreml.functions != "single":
        # Two functions in one program would each carry their own weight constants; sharing them
        # needs coremltools' save_multifunction, which loads every weight into memory.
        raise Phi3ExportError(f"recipe {recipe.name}: export.coreml.functions "
                              f"{recipe.export.coreml.functions!r} is not supported yet (use 'single')")
    if requested is not None and requested <= 0:
        raise Phi3ExportError(f"--max-length {requested}: must be a positive number of tokens")
    length = recipe.export.coreml.context_length if requested is None else requested
    limit = facts.context_length if isinstance(facts.context_length, int) else None
    if limit is not None and length > limit:
        raise Phi3ExportError(f"Core ML context length {length} exceeds the model's context length {limit}")
    return length


def normalise_package(package: Path) -> None:
    """Make the saved package byte-identical across runs (see module docstring)."""
    coremltools()
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / SPEC).read_bytes())
    for key in _DROPPED_METADATA:
        if key in spec.description.metadata.userDefined:
            del spec.description.metadata.userDefined[key]
    (package / SPEC).write_bytes(spec.SerializeToString(deterministic=True))

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old_to_new = {key: str(uuid.uuid5(_MANIFEST_NAMESPACE, entry["path"])) for key, entry in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {old_to_new[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = old_to_new[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def _metadata(model, recipe: Recipe, facts: ModelFacts, settings: dict, ctx: int) -> None:
    model.author = "phi3-export"
    model.short_description = f"{recipe.description or recipe.name}: stateful decoder, {settings.get('tag', '')} weights"
    model.version = tool_version()
    model.user_defined_metadata.update({
        # swift-transformers reads the model's name from this key.
        "co.huggingface.exporters.name": recipe.name,
        "co.huggingface.exporters.task": "text-generation",
        "co.huggingface.exporters.architecture": facts.architecture,
        "phi3_export.recipe": recipe.name,
        "phi3_export.context_length": str(ctx),
        "phi3_export.tool_version": tool_version(),
        "phi3_export.quantization": json.dumps(settings, sort_keys=True),
    })


def export_coreml(job: Job, qckpt: QuantizedCheckpoint, out: Path, ctx: int) -> Path:
    from phi3_export.export.coreml.program import build_program  # imports coremltools

    ct = coremltools()
    ckpt, facts, recipe, decoder = job.ckpt, job.facts, job.recipe, job.plan.decoder
    settings = {**job.settings.as_dict(), "tag": job.settings.tag}
    out.mkdir(parents=True)
    scratch = out.parent / f".{out.name}.scratch"
    try:
        weights = WeightStore(qckpt, scratch)
        with job.progress.task("coreml", len(decoder.layers)) as task:
            program = build_program(weights, decoder, ctx, task)
        job.progress.message("coreml: writing the ML program and its weights")
        with quiet_passes():
            model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                               pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
        del program
        _metadata(model, recipe, facts, settings, ctx)
        model.save(str(out / MLPACKAGE))
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    normalise_package(out / MLPACKAGE)
    copy_tokenizer_files(ckpt, out)
    shutil.copyfile(ckpt.folder / "config.json", out / "config.json")
    if (ckpt.folder / "generation_config.json").is_file():
        shutil.copyfile(ckpt.folder / "generation_config.json", out / "generation_config.json")
    s = decoder
    (out / "coreml_config.json").write_text(json.dumps({
        "package": MLPACKAGE,
        "minimum_os": MINIMUM_OS,
        "context_length": ctx,
        "inputs": {INPUT_IDS: {"dtype": "int32", "shape": [1, f"1..{ctx}"]},
                   CAUSAL_MASK: {"dtype": "float16", "shape": [1, 1, "1 or q", "past + q"],
                                 "meaning": "additive mask; its last dimension tells the program how many tokens the cache holds"}},
        "states": {name: {"dtype": "float16", "shape": [len(s.layers), 1, s.kv_heads, ctx, s.head_dim]} for name in (KEY_CACHE, VALUE_CACHE)},
        "outputs": {LOGITS: {"dtype": "float32", "shape": [1, "q", s.vocab]}},
        "kv_cache_bytes": 2 * len(s.layers) * s.kv_heads * ctx * s.head_dim * 2,
        "weights": "int blockwise (constexpr_blockwise_shift_scale): codes and zero points as in the ONNX artifact, scales float16",
    }, indent=2) + "\n")
    return out
