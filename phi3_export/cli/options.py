"""Options and parsers the `phi3-export` commands share (quantize and sweep spell them alike)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from phi3_export.errors import Phi3ExportError


def csv_values(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def int_values(value: str | None, flag: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in csv_values(value) or ())
    except ValueError:
        raise Phi3ExportError(f"{flag}: expected comma-separated positive integers, not {value!r}") from None
    if any(n < 1 for n in numbers):
        raise Phi3ExportError(f"{flag}: expected comma-separated positive integers, not {value!r}")
    return numbers


def options_group(*options):
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


# The options `quantize` and `sweep` share, spelled the same: in `sweep`, a comma-separated
# list where a grid axis makes sense (--method, --block-size, --target).
CALIBRATION_OPTIONS = options_group(
    click.option("--calib-text", type=click.Path(path_type=Path), help="AWQ calibration text file (default: the corpus' calibration part)."),
    click.option("--calib-samples", type=int, help="AWQ calibration windows (default from the recipe, 32)."),
    click.option("--calib-seqlen", type=int, help="AWQ tokens per calibration window (default from the recipe, 256)."),
    click.option("--seed", type=int, help="AWQ calibration sampling seed (default from the recipe, 0)."),
)
_BITS = click.option("--bits", type=click.Choice(["4", "8", "16", "32"]),
                     help="4/8: int weights (MatMulNBits); 16/32: unquantized fp16/fp32 reference.")
_LM_HEAD = click.option("--lm-head", type=click.Choice(["int4", "int8", "fp16", "fp32"]),
                        help="LM head precision (with tied embeddings: the shared table's). Default from the recipe.")
_MAX_LENGTH = click.option("--max-length", type=int,
                           help="Generation max_length (Core ML, Core AI: the KV state's context length): KV cache and RoPE tables are sized from it.")
_LEVEL_HELP = "MatMulNBits compute precision: 4 = int8 activations (fastest on CPU), 0/1 = fp32."
PRECISION_OPTIONS = options_group(
    _BITS, click.option("--accuracy-level", type=click.IntRange(0, 4), help=_LEVEL_HELP), _LM_HEAD, _MAX_LENGTH,
)
# sweep: the accuracy level is a grid axis (4 vs 1 changes greedy tokens on some models).
SWEEP_PRECISION_OPTIONS = options_group(
    _BITS,
    click.option("--accuracy-level", "--accuracy-levels", "accuracy_levels",
                 help=_LEVEL_HELP + " Comma-separated to sweep it, e.g. 4,1 (default: each target's)."),
    _LM_HEAD, _MAX_LENGTH,
)


# A checkpoint without tokenizer.json whose architecture's tokenizer is tiktoken ranks (Phi-3-small).
TIKTOKEN_OPTION = click.option(
    "--tiktoken-file", type=click.Path(path_type=Path),
    help="Phi-3-small without tokenizer.json: tiktoken ranks file to build it from (default: the checkpoint's cl100k_base.tiktoken).",
)


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


THRESHOLD = _Threshold()


def gate_options(f):
    for option in reversed((
        click.option("--baseline", type=click.Path(path_type=Path),
                     help="A previous report.json or validate result: exit 1 if any artifact of the same name got worse."),
        click.option("--max-kld-increase", type=THRESHOLD, help="Absolute rise of mean KLD allowed (recipe default 0.01)."),
        click.option("--max-ppl-increase-pct", type=THRESHOLD, help="Perplexity rise allowed, percent (recipe default 2)."),
        click.option("--max-size-increase-pct", type=THRESHOLD, help="Size growth allowed, percent (recipe default 1)."),
        click.option("--min-decode-tps-ratio", type=THRESHOLD,
                     help="Decode tok/s may fall to this fraction of the baseline, same machine only (recipe default 0.8)."),
    )):
        f = option(f)
    return f


# quantize's size budget (quant/budget.py); values are parsed by the API, so a bad one is a one-line error.
SIZE_BUDGET_HELP = (
    "Largest size of each ONNX target's decoder files (model.onnx + model.onnx.data; tokenizer and config files "
    "do not count): bytes, or a number with a unit: 850MB, 2.2GB, 2.2GiB. Each linear, the LM head and the "
    "embedding table get int4-g128, int4-g32 or int8-g128 (a tiny LM head or table may stay float), chosen to least error "
    "measured on the calibration text, whatever --method; the choices are in manifest.json. Below the smallest "
    "mix (int4-g128 everywhere) it is an error that names that size."
)
BITS_PER_WEIGHT_HELP = (
    "Instead of --size-budget: the linears, LM head and embedding table average at most B bits per weight, "
    "scales and zero points included. The budget is B x their weights / 8 + the rest of the decoder files "
    "(norms, biases, RoPE tables, graph) of the largest ONNX target."
)
BUDGET_OPTIONS = options_group(
    click.option("--size-budget", metavar="SIZE", help=SIZE_BUDGET_HELP),
    click.option("--bits-per-weight", metavar="B", help=BITS_PER_WEIGHT_HELP),
)
