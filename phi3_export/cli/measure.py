"""The commands that measure artifacts: `chat`, `validate`, `report`, `sweep`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from phi3_export.cli.options import (
    CALIBRATION_OPTIONS,
    SWEEP_PRECISION_OPTIONS,
    TIKTOKEN_OPTION,
    csv_values,
    gate_options,
    int_values,
)
from phi3_export.errors import Phi3ExportError


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


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="The user message. Without it: an interactive chat on a terminal, else the message from stdin.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Most tokens generated per answer (greedy).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image for an image + text artifact (repeat for several): <|image_1|>, ... go before the prompt "
                   "unless it has the tags.")
@click.option("--runtime-processor", is_flag=True,
              help="Images through onnxruntime-genai's own processor (0.18: always 16 crops) instead of ours "
                   "(the artifact's crop count, from its processor_config.json).")
def chat(artifact, prompt, max_new_tokens, images, runtime_processor):
    """Chat with an ONNX artifact through onnxruntime-genai, the runtime apps use.

    ARTIFACT is an ONNX artifact folder, or a quantize OUT folder (its cpu artifact is used).
    With --image (Phi-3-vision artifacts), each image is checked with PIL, HD-transformed
    with the artifact's own crop count and sent with the prompt; the images stay in the
    conversation.

    \b
    Examples:
      phi3-export chat out/ --prompt "What is a Python list?"
      phi3-export chat out/onnx-mobile                      # interactive: empty line or Ctrl-D ends
      echo "Name three colors." | phi3-export chat out/
      phi3-export chat out/ --image chart.png --prompt "What does this chart show?"
    """
    from phi3_export.validate.generate import Conversation

    if runtime_processor and not images:
        raise Phi3ExportError("--runtime-processor: only with --image")
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise Phi3ExportError("chat: no --prompt and nothing on stdin")
    conversation = Conversation(_chat_artifact(artifact), tuple(images), runtime_processor)

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


@click.command()
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
@TIKTOKEN_OPTION
@click.option("--quiet", is_flag=True, help="No progress output.")
def validate(path, reference, eval_text, providers, json_path, window, stride, prompt_lengths, new_tokens, runs, threads,
             no_speed, coreai_windows, coreai_tokens, cache_dir, tiktoken_file, quiet):
    """Measure artifacts against the unquantized checkpoint: accuracy, speed, memory.

    PATH is an OUT folder (every artifact in its manifest.json) or one artifact folder.
    One record per (artifact, execution provider): perplexity of both on the same ids,
    KL divergence of the next-token distributions (mean, p99) and top-1 agreement,
    tokenizer parity, where greedy chat generations part ways, long-context probes,
    prefill/decode tokens/s and time to first token (median of --runs) and the peak
    memory of the process that ran them. Providers this onnxruntime lacks are recorded
    as "not run" with the reason, beside the checks that need no provider. A Core ML
    package is evaluated op by op from the saved program; a Core AI asset runs on Apple's
    own runtime (on Linux its CPU reference: accuracy, not speed). An image + text artifact
    (Phi-3-vision) also gets image checks: vision features vs the torch reference on the
    runtime processor's pixel_values, image-token counts vs the formula, the runtime's crop
    count vs the model's (onnxruntime-genai 0.18 always makes 16), image-prompt logits, and
    image encode time, time to first token and decode tokens/s with a 1344x1008 image.

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
        providers=csv_values(providers), eval_text=eval_text, window=window, stride=stride,
        prompt_lengths=int_values(prompt_lengths, "--prompt-lengths"), new_tokens=new_tokens, runs=runs,
        threads=threads, speed=not no_speed, coreai_windows=coreai_windows,
        coreai_tokens=coreai_tokens, tiktoken_file=tiktoken_file,
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


def _finish_report(doc: dict, out: Path) -> None:
    click.echo(f"report: {out / 'report.md'}  {out / 'report.html'}  {out / 'report.json'}")
    for note in doc["notes"]:
        click.echo(f"note: {note}", err=True)
    if doc["regressions"]:
        click.echo(f"{len(doc['regressions'])} regression(s) against {doc['baseline']}:\n  " + "\n  ".join(doc["regressions"]),
                   err=True)
        sys.exit(1)


@click.command()
@click.argument("records", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for report.json, report.md, report.html.")
@gate_options
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


@click.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Local Hugging Face folder.")
@click.option("--recipe", help="Recipe name or path (default: matched from the checkpoint).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder: runs/<point>/ artifacts and report/.")
@click.option("--method", "--methods", "methods", default="rtn,awq", show_default=True,
              help="Comma-separated methods: rtn, awq, gptq, awq-gptq.")
@click.option("--block-size", "--block-sizes", "block_sizes", default="32,128", show_default=True, help="Comma-separated block sizes.")
@click.option("--size-budget", "--size-budgets", "size_budgets",
              help="Comma-separated size budgets (as quantize --size-budget: 850MB, 2.2GB, bytes); each is a point per "
                   "method, the budget choosing every tensor's precision; 'none' adds the --block-size points too.")
@click.option("--symmetric/--asymmetric", default=None, help="One symmetry for every point (default: the recipe's).")
@click.option("--both-symmetries", is_flag=True, help="Sweep symmetric and asymmetric too.")
@click.option("--target", "targets", default="cpu", show_default=True, help="Comma-separated targets to export and validate.")
@SWEEP_PRECISION_OPTIONS
@CALIBRATION_OPTIONS
@click.option("--eval-text", type=click.Path(path_type=Path), help="UTF-8 text for perplexity/KLD (default: the corpus' eval part).")
@click.option("--runs", default=3, show_default=True, help="Timed runs per speed figure.")
@click.option("--no-speed", is_flag=True, help="Accuracy only.")
@gate_options
@TIKTOKEN_OPTION
@click.option("--quiet", is_flag=True, help="No progress output.")
def sweep(checkpoint, recipe, out, methods, block_sizes, size_budgets, symmetric, both_symmetries, targets, bits, accuracy_levels, lm_head,
          max_length, calib_text, calib_samples, calib_seqlen, seed, eval_text, runs, no_speed, baseline, max_kld_increase,
          max_ppl_increase_pct, max_size_increase_pct, min_decode_tps_ratio, tiktoken_file, quiet):
    """Quantize -> validate -> report over a grid of methods, block sizes or size budgets, symmetry and accuracy level.

    One command for the accuracy-vs-size picture of a model: every grid point is exported
    to OUT/runs/<method>-g<block><s|a>/ (a budget's: <method>-<budget>-<s|a>/, an accuracy
    level's: ...-al<level>) and validated against the checkpoint; the report lands in
    OUT/report/, a method's budget points drawn as one curve. The options are quantize's,
    a comma-separated list where they make a grid axis.

    \b
    Examples:
      phi3-export sweep --checkpoint ./ckpt --out sweep/
      phi3-export sweep --checkpoint ./ckpt --method awq --block-size 32,64,128 --both-symmetries --calib-samples 16 --out sweep/
      phi3-export sweep --checkpoint ./ckpt --method rtn,gptq --size-budget 80MB,90MB,100MB,none --block-size 128 --out sweep/
      phi3-export sweep --checkpoint ./ckpt --method rtn --accuracy-level 4,1 --out sweep/   # what int8 activations cost
      phi3-export sweep --checkpoint ./ckpt --out sweep/ --baseline main/report.json   # CI gate over the grid
    """
    from phi3_export.progress import Progress
    from phi3_export.sweep import grid
    from phi3_export.sweep import sweep as run_sweep
    from phi3_export.validate.run import ValidateOptions

    sizes = int_values(block_sizes, "--block-size")
    if both_symmetries and symmetric is not None:
        raise Phi3ExportError("--both-symmetries: give it or --symmetric/--asymmetric, not both")
    symmetries = (True, False) if both_symmetries else (symmetric,)
    given_levels = csv_values(accuracy_levels) or ()
    if any(v not in ("0", "1", "2", "3", "4") for v in given_levels):
        raise Phi3ExportError(f"--accuracy-level: expected comma-separated levels 0-4, not {accuracy_levels!r}")
    levels = tuple(int(v) for v in given_levels) or (None,)
    points = grid(csv_values(methods) or (), sizes, symmetries, csv_values(size_budgets) or (), levels)
    options = ValidateOptions(eval_text=eval_text, runs=runs, speed=not no_speed, tiktoken_file=tiktoken_file)
    overrides = {"max_kld_increase": max_kld_increase, "max_ppl_increase_pct": max_ppl_increase_pct,
                 "max_size_increase_pct": max_size_increase_pct, "min_decode_tps_ratio": min_decode_tps_ratio}
    given = {"bits": int(bits) if bits else None, "lm_head": lm_head, "max_length": max_length,
             "calib_text": calib_text, "calib_samples": calib_samples, "calib_seqlen": calib_seqlen, "seed": seed,
             "tiktoken_file": tiktoken_file}
    doc = run_sweep(checkpoint, out, recipe=recipe, points=points, targets=csv_values(targets), validate_options=options,
                    progress=Progress(enabled=not quiet), baseline=baseline, overrides=overrides,
                    quantize_options={k: v for k, v in given.items() if v is not None})
    _finish_report(doc, out / "report")
