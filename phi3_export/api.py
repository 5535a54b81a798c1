"""The Python API: plain functions the CLI wraps. Data flows one way:

checkpoint -> recipe check -> quantized checkpoint -> artifacts (one per format x target) -> manifest
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from phi3_export.checkpoint import Checkpoint
from phi3_export.checkpoint.check import (
    check_image_processor,
    check_memory,
    check_recipe,
    check_tensors,
    checked_architecture,
    matching_recipes,
)
from phi3_export.errors import Phi3ExportError
from phi3_export.export import coreai
from phi3_export.export.coreml import MLPACKAGE, export_coreml
from phi3_export.export.coreml.artifact import context_length as coreml_context_length
from phi3_export.export.coreml.contract import MINIMUM_OS
from phi3_export.export.onnx.artifact import export_onnx
from phi3_export.export.onnx.sizes import decoder_file_bytes
from phi3_export.export.onnx.targets import check_target_ops, resolve_target
from phi3_export.job import Job
from phi3_export.manifest import MANIFEST_VERSION, config_sha256, write_manifest
from phi3_export.output import check_free_space, check_replaceable, file_entries, staged_output
from phi3_export.paths import check_separate
from phi3_export.progress import Progress
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint
from phi3_export.quant.request import QuantizeRequest
from phi3_export.quant.settings import QuantSettings
from phi3_export.quant.stage import QUANTIZERS
from phi3_export.recipes import Recipe, list_recipes, load_recipe
from phi3_export.recipes.loader import clean_message
from phi3_export.recipes.schema import AwqSettings
from phi3_export.versions import library_versions, tool_version

FORMATS = ("onnx", "coreml", "coreai")
# Apple formats compute in float16: int4/int8 codes or float16 weights.
APPLE_BITS = (4, 8, 16)


@dataclass(frozen=True)
class RecipeChoice:
    recipe: Recipe
    how: str  # "given", "fixture", "matched", "generic"


def _coreai_options(recipe: Recipe, facts, max_length: int | None, plan) -> coreai.CoreAIOptions:
    """Checked before quantizing: the extra is installed and the plan's blocks have Core AI forms."""
    from phi3_export.export.coreai.lib import check_installed
    from phi3_export.export.coreai.module import check_supported

    chosen = coreai.options(recipe, facts, max_length)
    check_installed()
    check_supported(plan.decoder)
    return chosen


# Tokens left for the text of an image prompt (chat template, question, a short answer).
IMAGE_PROMPT_TEXT = 256


def choose_recipe(ckpt: Checkpoint, facts, recipe: str | None) -> RecipeChoice:
    source = str(ckpt.folder / "config.json")
    if recipe is not None:
        chosen = load_recipe(recipe)
        check_recipe(chosen, facts, is_fixture_of_recipe=ckpt.fixture_recipe() == chosen.name, source=source)
        return RecipeChoice(chosen, "given")
    if ckpt.fixture_recipe():
        chosen = load_recipe(ckpt.fixture_recipe())
        check_recipe(chosen, facts, is_fixture_of_recipe=True, source=source)
        return RecipeChoice(chosen, "fixture")
    matches = matching_recipes([load_recipe(n) for n in list_recipes()], facts)
    if len(matches) > 1:
        names = ", ".join(r.name for r in matches)
        raise Phi3ExportError(f"{source}: matches several shipped recipes ({names}); pick one with --recipe")
    if matches:
        return RecipeChoice(matches[0], "matched")
    # A fine-tune with other dims, or a test model: the architecture's generic defaults.
    # A tied table serves the embedding lookup and the LM head at once; int4 there costs
    # the most accuracy per byte saved, so it stays int8 (still far smaller than a float copy).
    overrides = {"lm_head": "int8"} if facts.tie_word_embeddings is True else {}
    generic = Recipe(name=f"{facts.model_type.replace('_', '-')}-generic", description="generic defaults", model=facts,
                     quantization={"overrides": overrides})
    return RecipeChoice(generic, "generic")


def _estimate_bytes(ckpt: Checkpoint, settings: QuantSettings, n_targets: int) -> int:
    params = sum(_numel(ckpt.shape(n)) for n in ckpt.names)
    per_param = {4: 0.6, 8: 1.1, 16: 2.0, 32: 4.0}[settings.bits]
    staging = params * (2.0 if not settings.quantized else per_param)
    return int(params * per_param * n_targets + staging) + (64 << 20)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


CALIBRATION_FLAGS = {"samples": "--calib-samples", "seqlen": "--calib-seqlen", "seed": "--seed"}


def _awq_settings(recipe: Recipe, facts, samples: int | None, seqlen: int | None, seed: int | None,
                  calibrating: bool) -> AwqSettings:
    """The recipe's AWQ settings with the calibration flags on top, validated by the recipe schema
    (a flag given is checked whatever the method; the context bound only when calibrating)."""
    given = {k: v for k, v in (("samples", samples), ("seqlen", seqlen), ("seed", seed)) if v is not None}
    try:
        merged = AwqSettings.model_validate({**recipe.quantization.awq.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        flag = f"{CALIBRATION_FLAGS[key]} {given[key]}" if key in given else f"recipe {recipe.name}: quantization.awq.{key}"
        raise Phi3ExportError(f"{flag}: {clean_message(err['msg'])}") from None
    context = facts.context_length
    if calibrating and isinstance(context, int) and merged.seqlen > context:
        where = f"--calib-seqlen {merged.seqlen}" if seqlen is not None else f"recipe {recipe.name}: quantization.awq.seqlen"
        raise Phi3ExportError(f"{where} exceeds the model's context length {context}")
    return merged


def _request(awq: AwqSettings, needs_calibration: bool, calib_text) -> QuantizeRequest:
    if not needs_calibration:
        return QuantizeRequest()
    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.quant.awq_search import AwqOptions

    if calib_text is not None:
        path = Path(calib_text)
        if not path.is_file():
            raise Phi3ExportError(f"{path}: --calib-text file not found")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Phi3ExportError(f"{path}: --calib-text is not UTF-8 text (byte {exc.start})") from None
        if not text.strip():
            raise Phi3ExportError(f"{path}: --calib-text is empty")
    else:
        text = corpus_text("calibration")  # disjoint from the eval part that validate uses
    options = AwqOptions(samples=awq.samples, seqlen=awq.seqlen, seed=awq.seed, alpha_grid=awq.alpha_grid, clip=awq.clip)
    return QuantizeRequest(calibration_text=text, awq=options, resume=True)


def _warn_slow_int8(settings: QuantSettings, plan, resolved, progress: Progress) -> None:
    """8-bit MatMulNBits with fp32 compute has no fast CPU kernel in onnxruntime 1.32.

    Measured on SmolLM2-135M (tied int8 LM head, accuracy level 1): ~5 decode tok/s
    against ~65 with an int4 table and ~100 with the int8 table at accuracy level 4.
    """
    if settings.mix:
        count = sum(label.startswith("int8") for label in settings.mix.values())
        roles = [f"{count} tensor{'s' if count > 1 else ''} of the size budget's mix"] if count else []
    else:
        roles = [r for r in (*plan.decoder.roles, "lm_head") if settings.precision(r) == "int8"]
    slow = [t.name for t in resolved if t.name in ("cpu", "mobile") and t.accuracy_level < 4]
    if roles and slow:
        progress.warning(f"int8 weights ({', '.join(roles)}) at accuracy level < 4 on target {', '.join(slow)}: onnxruntime "
                         "has no fast CPU kernel for 8-bit MatMulNBits with fp32 compute (decode ~10x slower); "
                         "use --accuracy-level 4 or --lm-head int4 unless you need fp32 compute")


def _vision_entry(recipe: Recipe, plan) -> dict:
    """An image + text artifact's vision settings (its files are in the artifact's ``files``)."""
    if plan.image is None:
        return {}
    from phi3_export.export.onnx.vision import BLOCK

    options = recipe.export.vision
    quantized = options.precision in ("int4", "int8")
    return {"vision": {"precision": options.precision, "num_crops": options.num_crops, **({"block_size": BLOCK} if quantized else {}),
                       "models": {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "model.onnx"},
                       "processor_config": "processor_config.json"}}


def artifact_name(recipe: Recipe, settings: QuantSettings, fmt: str, target: str | None, variant: str | None = None) -> str:
    """``<recipe>-<method>-<tag>-<format>[-<target>]``; a size budget's mix names its budget instead of
    the tag (``phi-3-mini-4k-awq-budget2.2GB-sym-onnx-cpu``), an explicit mix a digest of it."""
    method = settings.method if settings.quantized else "float"
    return f"{recipe.name}-{method}-{variant or settings.tag}-{fmt}" + (f"-{target}" if target else "")


def _level_suffix(recipe: Recipe, settings: QuantSettings, target) -> str:
    """``-al<n>`` when --accuracy-level gave a target another compute level than its recipe does, so
    the same weights at two levels (a sweep's accuracy-level axis) are two named artifacts."""
    own = resolve_target(target.name, recipe, settings.bits, recipe.quantization.accuracy_level, target.max_length)
    return f"-al{target.accuracy_level}" if settings.quantized and target.accuracy_level != own.accuracy_level else ""


def _mix_variant(settings: QuantSettings, budget) -> str | None:
    if not settings.mix:
        return None
    symmetry = "sym" if settings.symmetric else "asym"
    if budget is not None:
        return f"budget{budget.label}-{symmetry}"
    digest = hashlib.sha256(json.dumps(settings.mix, sort_keys=True).encode()).hexdigest()[:8]
    return f"mix{digest}-{symmetry}"


def quantize(
    checkpoint: str | Path, out: str | Path, *, recipe: str | None = None, bits: int | None = None,
    method: str | None = None, formats: tuple[str, ...] = ("onnx",), targets: tuple[str, ...] | None = None,
    block_size: int | None = None, symmetric: bool | None = None, accuracy_level: int | None = None,
    lm_head: str | None = None, max_length: int | None = None, force: bool = False, keep_quantized: bool = False, progress: Progress | None = None,
    calib_text: str | Path | None = None, calib_samples: int | None = None, calib_seqlen: int | None = None,
    seed: int | None = None, tiktoken_file: str | Path | None = None, size_budget: str | int | None = None,
    bits_per_weight: float | None = None, mix: dict[str, str] | None = None, sensitivity_cache: Path | None = None,
) -> dict:
    """Quantize a checkpoint and export one artifact per format x target; returns the manifest.

    ``size_budget`` (bytes, or a string with a unit: "850MB", "2.2GB", "2.2GiB") or
    ``bits_per_weight`` chooses each linear's, the LM head's and the embedding table's storage
    among int4-g128 / int4-g32 / int8-g128 (float for tiny tensors) to least measured error
    with every ONNX target's model.onnx + model.onnx.data within the budget (quant/budget.py);
    it calibrates whatever the method. ``mix`` (tensor name -> "int4-g32", ...) gives the
    choices directly, e.g. a previous run's manifest ``settings.mix``. ``sensitivity_cache``: a
    file the budget's measured sensitivities are kept in and reused from when their inputs match
    (checkpoint, calibration, symmetry; not the budget or the method), left for the caller to
    remove: `sweep` measures them once for all its budgets. Without it they are kept beside
    ``out`` only until the run completes (an interrupted run reuses them).

    An interrupted AWQ run keeps its finished layers in ``.<out>.awq-work`` beside ``out``;
    the same command run again resumes after the last finished layer.

    ``tiktoken_file``: for a checkpoint without tokenizer.json whose tokenizer is tiktoken ranks
    (Phi-3-small), the ranks to build it from (default: the folder's own ranks file).
    """
    from phi3_export.quant import budget as size_budgets

    progress = progress or Progress(enabled=False)
    out = Path(out)
    budget = size_budgets.parse_budget(size_budget, bits_per_weight)  # a bad value fails before anything is read
    if budget is not None and mix:
        raise Phi3ExportError(f"{budget.flag}: a mix is given too; give one of them")
    if budget is not None and lm_head:
        raise Phi3ExportError(f"--lm-head {lm_head}: {budget.flag} chooses the LM head's storage too; give one of them")
    # Inputs are never written to: an --out that is, holds or lies inside the checkpoint is refused.
    check_separate(out, Path(checkpoint), "--checkpoint")
    # Every check below reads headers and config only: nothing is allocated or written until they pass.
    ckpt = Checkpoint(checkpoint, tiktoken_file=tiktoken_file)
    source = str(ckpt.folder / "config.json")
    arch = checked_architecture(ckpt)  # config.json range-checked, before any fact or plan is built from it
    facts = arch.facts_from_config(ckpt.config, ckpt.tokenizer_kind)
    if max_length is not None and isinstance(facts.context_length, int) and max_length > facts.context_length:
        raise Phi3ExportError(f"--max-length {max_length} exceeds the model's context length {facts.context_length} "
                              f"({source} max_position_embeddings)")
    plan = arch.plan(ckpt.config)
    choice = choose_recipe(ckpt, facts, recipe)
    check_image_processor(ckpt, choice.recipe, plan)
    settings = QuantSettings.from_recipe(
        choice.recipe.quantization, bits=bits, method=method, block_size=block_size, symmetric=symmetric,
        accuracy_level=accuracy_level, overrides={**choice.recipe.quantization.overrides, "lm_head": lm_head} if lm_head else None,
    )
    formats = tuple(dict.fromkeys(f for fmt in formats for f in (FORMATS if fmt == "all" else (fmt,))))
    for fmt in formats:
        if fmt not in FORMATS:
            raise Phi3ExportError(f"--format: unknown format {fmt!r} (available: {', '.join(FORMATS)}, all)")
        if fmt in plan.refused_formats:
            raise Phi3ExportError(f"--format {fmt}: not available for {facts.architecture}: {plan.refused_formats[fmt]}")
    for fmt in ("coreml", "coreai"):
        if fmt in formats and settings.bits not in APPLE_BITS:
            raise Phi3ExportError(f"--format {fmt}: --bits {settings.bits} is not available (the program computes in fp16; "
                                  f"choose --bits {', '.join(map(str, APPLE_BITS))})")
    chosen_targets = (targets or tuple(choice.recipe.export.targets)) if "onnx" in formats else ()
    resolved = [resolve_target(t, choice.recipe, settings.bits, settings.accuracy_level, max_length) for t in chosen_targets]
    if plan.image is not None:  # an image model whose KV cache cannot hold one image prompt is no artifact
        crops = choice.recipe.export.vision.num_crops
        need = plan.image.most_image_tokens(crops) + IMAGE_PROMPT_TEXT
        short = [t for t in resolved if t.max_length < need]
        if short:
            where = "--max-length" if max_length is not None else f"recipe {choice.recipe.name}: export.max_length"
            raise Phi3ExportError(f"{where}: {short[0].max_length} tokens cannot hold an image prompt: one image takes up to "
                                  f"{need - IMAGE_PROMPT_TEXT} tokens at num_crops {crops}; use at least {need}")
    for target in resolved:
        check_target_ops(target, plan)
    coreml_context = coreml_context_length(choice.recipe, facts, max_length) if "coreml" in formats else None
    coreai_options = _coreai_options(choice.recipe, facts, max_length, plan) if "coreai" in formats else None
    quantizer = QUANTIZERS[settings.method]
    # A size budget measures each tensor's sensitivity on the calibration text, whatever the method.
    calibrating = quantizer.needs_calibration or budget is not None
    awq = _awq_settings(choice.recipe, facts, calib_samples, calib_seqlen, seed, calibrating)
    longest = max([t.max_length for t in resolved] + ([coreml_context] if coreml_context else [])
                  + ([coreai_options.context_length] if coreai_options else []), default=0)
    blame = {"rope": f"--max-length {max_length}"} if max_length is not None else {}
    if calibrating and (calib_samples is not None or calib_seqlen is not None):
        blame["calibration"] = " ".join(f"{flag} {v}" for flag, v in (("--calib-samples", calib_samples),
                                                                      ("--calib-seqlen", calib_seqlen)) if v is not None)
    check_memory(ckpt.config, source, max_length=longest, blame=blame,
                 calibration=(awq.samples, awq.seqlen) if calibrating else None)
    check_tensors(ckpt, plan)
    if mix:
        settings = size_budgets.checked_mix(plan, settings, mix)
    # Costs and the smallest possible decoder per target: an impossible budget is refused here, before anything is written.
    bplan = size_budgets.plan_budget(ckpt, plan, settings, resolved, budget) if budget is not None else None
    progress.message(f"recipe: {choice.recipe.name} ({choice.how})")
    if bplan is None:  # a budget's mix is known after its sensitivity pass: warned about then
        _warn_slow_int8(settings, plan, resolved, progress)
    check_replaceable(out, force)
    check_free_space(out.parent if out.parent.exists() else Path.cwd(), _estimate_bytes(ckpt, settings, len(resolved) + 2 * ("coreml" in formats) + ("coreai" in formats)))
    request = _request(awq, calibrating, calib_text)

    owned_cache = sensitivity_cache is None
    if owned_cache:
        sensitivity_cache = out.parent / f".{out.name}.budget-sensitivity.json"
    with staged_output(out, force) as staging:
        chosen = None
        if bplan is not None:
            chosen, errors = size_budgets.measure_and_choose(ckpt, arch, plan, bplan, request.calibration_text, request.awq,
                                                        progress, sensitivity_cache)
            settings = chosen.settings
            _warn_slow_int8(settings, plan, resolved, progress)
        variant = _mix_variant(settings, budget)
        job = Job(ckpt=ckpt, arch=arch, plan=plan, facts=facts, recipe=choice.recipe, settings=settings, progress=progress)
        # A resumable method works in a folder that outlives a failed or interrupted run.
        qdir = out.parent / f".{out.name}.{settings.method}-work" if quantizer.resumable else staging / "quantized"
        fresh = not qdir.exists()
        try:
            quantizer.run(job, qdir, request)
        except Phi3ExportError:
            # Bad input found mid-stream (a NaN weight): nothing to resume from this run's folder.
            # (An interrupted run keeps it: the same command resumes after its last finished layer.)
            if fresh and qdir.parent != staging:
                shutil.rmtree(qdir, ignore_errors=True)
            raise
        qckpt = QuantizedCheckpoint(qdir)
        artifacts = []
        achieved = {}
        for target in resolved:
            folder = staging / f"onnx-{target.name}"
            export_onnx(job, qckpt, target, folder)
            achieved[target.name] = decoder_file_bytes(folder)
            files = file_entries(folder, staging)
            artifacts.append({
                "name": artifact_name(choice.recipe, settings, "onnx", target.name, variant) + _level_suffix(choice.recipe, settings, target),
                "format": "onnx", "target": target.name, "path": folder.name,
                "max_length": target.max_length, "accuracy_level": target.accuracy_level,
                "providers": list(target.providers) or ["cpu"],
                "size_bytes": sum(f["size"] for f in files), "files": files,
                **_vision_entry(choice.recipe, plan),
            })
        if coreml_context is not None:
            folder = staging / "coreml"
            export_coreml(job, qckpt, folder, coreml_context)
            files = file_entries(folder, staging)
            artifacts.append({
                "name": artifact_name(choice.recipe, settings, "coreml", None, variant), "format": "coreml", "target": None,
                "path": folder.name, "package": MLPACKAGE, "max_length": coreml_context, "context_length": coreml_context,
                "minimum_os": MINIMUM_OS, "size_bytes": sum(f["size"] for f in files), "files": files,
            })
        if coreai_options is not None:
            folder = staging / "coreai"
            coreai.export_coreai(job, qckpt, folder, coreai_options)
            files = file_entries(folder, staging)
            artifacts.append({
                "name": artifact_name(choice.recipe, settings, "coreai", None, variant), "format": "coreai", "target": None,
                "path": folder.name, "asset": coreai.AIMODEL, "max_length": coreai_options.context_length,
                "context_length": coreai_options.context_length, "prefill_chunk": coreai_options.prefill_chunk,
                "precision": coreai_options.precision, "minimum_os": coreai.MINIMUM_OS,
                "size_bytes": sum(f["size"] for f in files), "files": files,
            })
        qckpt.close()
        ckpt.close()
        if keep_quantized:
            if qdir.parent != staging:
                shutil.move(str(qdir), staging / "quantized")
            qdir = staging / "quantized"
            artifacts.append({"name": artifact_name(choice.recipe, settings, "quantized", None, variant), "format": "quantized-checkpoint",
                              "target": None, "path": "quantized", "files": file_entries(qdir, staging)})
        else:
            shutil.rmtree(qdir)
        manifest = {
            "tool": {"name": "phi3-export", "version": tool_version()},
            "versions": library_versions(),
            "source": {
                "architecture": facts.architecture,
                "config_sha256": config_sha256(ckpt.folder),
            },
            "recipe": {"name": choice.recipe.name, "how_chosen": choice.how},
            "settings": settings.as_dict(),
            # A mix's layer linears, weights per choice: what report's "bits/w linear" averages over.
            **({"mix_linear_weights": size_budgets.mix_linear_weights(plan, settings)} if settings.mix else {}),
            # The size budget: what was asked, predicted and achieved per ONNX target, how many tensors took each choice.
            **({"size_budget": size_budgets.manifest_block(bplan, chosen, achieved, errors)} if chosen is not None else {}),
            # Linears AWQ left to plain RTN (a MoE expert too few calibration tokens reached).
            **({"rtn_fallback": qckpt.meta["awq_rtn_fallback"]} if qckpt.meta.get("awq_rtn_fallback") else {}),
            "model": json.loads(facts.model_dump_json(exclude_none=True)),  # MoE facts only where they apply
            "artifacts": artifacts,
        }
        if chosen is not None:
            size_budgets.check_achieved(bplan, chosen, achieved)  # over the budget or off the prediction: our bug, loudly
        write_manifest(staging, manifest)
    if owned_cache:
        sensitivity_cache.unlink(missing_ok=True)
    return {"schema_version": MANIFEST_VERSION, **manifest}
