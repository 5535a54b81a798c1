"""Size-budgeted mixed precision: ``quantize --size-budget 2.2GB`` or ``--bits-per-weight 4.5``.

Each *choosable* tensor (every quantized linear of the decoder layers, the LM head, and the
embedding table: tied, once; untied, when the decoder graph gathers from it) is stored as one
of int4-g128, int4-g32 or int8-g128 at the run's symmetry, or kept float when it is tiny
(``TINY_WEIGHTS``); the choice goes into ``QuantSettings.mix`` before the method (rtn, awq,
gptq, ...) runs, and every quantizer stores each tensor as ``settings.storage(name, role)``.
MoE expert weights are not choosable (QMoE takes one precision for all of them), nor are float
linears (a router); they stay as the recipe has them, in the fixed part.

Size model (export/onnx/sizes.py, beside the code that writes the bytes): a tensor's bytes per
candidate and target are exact (codes padded to whole blocks, scales in the target's io dtype,
zero points when asymmetric or gathered); the rest of the decoder files (norms, biases, RoPE
tables, non-choosable tensors, graph proto, alignment) is the *fixed part*, measured by running
the real emitter over zeros of the smallest mix. The budget limits ``model.onnx`` +
``model.onnx.data`` of *every* ONNX target: one mix serves them all, so choices are costed at
each tensor's largest cost over the targets (fp32 scales on cpu/mobile) against the smallest
room any target leaves; the chosen mix is then predicted exactly per target by the same dry run
and tightened until every target fits.

``--bits-per-weight B`` is the budget ``floor(B x W / 8) + F``: W the weights of the choosable
tensors, F the largest target's fixed part, so the choosable tensors average at most B bits
per weight, scales and zero points included, on every target.

The choice: per tensor and candidate an error measured on the calibration text
(quant/budget_sensitivity.py), then an exact multiple-choice knapsack by dynamic programming
over the room above the smallest mix, in ``DP_UNITS`` steps (costs rounded up, so the answer
always fits; at most one unit per tensor is lost to the rounding).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal

import numpy as np

from phi3_export.arch.plan import ModelPlan, Moe
from phi3_export.errors import Phi3ExportError
from phi3_export.quant.settings import QuantSettings, Storage, parse_storage

# Weights at or below which a tensor may also stay float (at the target's io dtype): at
# Phi-3-mini width no linear is this small; in test models every one is. Linears in an AWQ
# scaling group never do (AWQ's search quantizes the group whatever the method).
TINY_WEIGHTS = 1 << 16
DP_UNITS = 1 << 16
CANDIDATE_LABELS = ("int4-g128", "int4-g32", "int8-g128")
FLOAT_LABEL = "fp16"  # "kept float": written at the target's io dtype
MIB, MB = 1 << 20, 10**6

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """What the user asked for: ``size_bytes`` (--size-budget) or ``bits_per_weight``."""

    size_bytes: int | None
    bits_per_weight: float | None
    label: str  # in artifact names: "2.2GB", "850MB", "4.5bpw"

    @property
    def flag(self) -> str:
        return f"--size-budget {self.label}" if self.size_bytes is not None else f"--bits-per-weight {self.bits_per_weight:g}"


def parse_size(value: str | int) -> tuple[int, str]:
    """(bytes, label) of a size budget: plain bytes, or a number with a unit (850MB, 2.2GB, 2.2GiB)."""
    if isinstance(value, bool):
        raise Phi3ExportError(f"--size-budget {value!r}: expected bytes or a size with a unit, e.g. 850MB, 2.2GB, 2.2GiB")
    if isinstance(value, int):
        if value <= 0:
            raise Phi3ExportError(f"--size-budget {value}: must be a positive number of bytes")
        return value, (f"{value // MB}MB" if value % MB == 0 else f"{value}B")
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise Phi3ExportError(f"--size-budget {value!r}: expected bytes or a size with a unit, e.g. 850MB, 2.2GB, 2.2GiB")
    number = Decimal(match.group(1))  # exact: 0.3GB is 300000000 bytes, not one less
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise Phi3ExportError(f"--size-budget {value!r}: must be at least one byte")
    canonical = "B" if unit in ("", "b") else unit[0].upper() + ("iB" if unit.endswith("ib") else "B")
    return size, f"{number.normalize():f}{canonical}"


def parse_budget(size_budget: str | int | None, bits_per_weight: float | None) -> Budget | None:
    """The budget asked for, or None; one-line errors naming the flag."""
    if size_budget is not None and bits_per_weight is not None:
        raise Phi3ExportError("--size-budget and --bits-per-weight: give one of them, not both")
    if size_budget is not None:
        size, label = parse_size(size_budget)
        return Budget(size, None, label)
    if bits_per_weight is not None:
        try:
            bits = float(bits_per_weight)
        except (TypeError, ValueError):
            bits = math.nan
        if not math.isfinite(bits) or bits <= 0:
            raise Phi3ExportError(f"--bits-per-weight {bits_per_weight!r}: expected a positive number of bits, e.g. 4.5")
        return Budget(None, bits, f"{bits:g}bpw")
    return None


# ---- what can be chosen -------------------------------------------------------------------------


@dataclass(frozen=True)
class Choosable:
    """A tensor the budget chooses a storage for."""

    name: str
    role: str  # the registry role ("lm_head" for a tied table, "embed_tokens" for an untied one)
    shape: tuple[int, int]
    kind: str  # "linear", "lm_head", "embedding" (untied lookup), "table" (tied: lookup and LM head)
    layer: int | None
    candidates: tuple[Storage, ...]
    lookup: bool = False  # gathered by GatherBlockQuantized in the decoder graph (zero points always written)

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


def candidates(shape: tuple[int, int], symmetric: bool, may_stay_float: bool = True) -> tuple[Storage, ...]:
    found = tuple(parse_storage(label, symmetric) for label in CANDIDATE_LABELS)
    return found + ((Storage(FLOAT_LABEL),) if may_stay_float and shape[0] * shape[1] <= TINY_WEIGHTS else ())


def choosable_tensors(plan: ModelPlan, settings: QuantSettings) -> list[Choosable]:
    """The tensors a budget chooses for, in the order the decoder graph writes them."""
    d, sym = plan.decoder, settings.symmetric
    lookup = plan.image is None  # an image + text decoder takes inputs_embeds: no table lookup in model.onnx
    items: list[Choosable] = []
    table = (d.vocab, d.hidden)
    if d.tied:
        items.append(Choosable(d.embedding, "lm_head", table, "table", None, candidates(table, sym), lookup))
    elif lookup:
        items.append(Choosable(d.embedding, "embed_tokens", table, "embedding", None, candidates(table, sym), True))
    for layer in d.layers:
        linears = layer.attention.linears() + (() if isinstance(layer.mlp, Moe) else layer.mlp.linears())
        # A linear in an AWQ scaling group stays quantized: AWQ's scale search fake-quantizes the whole group.
        scaled = {lin.weight for group in layer.scaling_groups for lin in group.linears}
        for lin in linears:
            if lin.quantize:
                items.append(Choosable(lin.weight, lin.role, lin.shape, "linear", layer.index,
                                       candidates(lin.shape, sym, lin.weight not in scaled)))
    if not d.tied:
        head = d.lm_head
        items.append(Choosable(head.weight, "lm_head", head.shape, "lm_head", None, candidates(head.shape, sym)))
    return items


# ---- costs and the fixed part ---------------------------------------------------------------------


@dataclass
class BudgetPlan:
    """The budget in bytes and everything the choice needs that does not depend on calibration."""

    budget: Budget
    budget_bytes: int
    items: list[Choosable]
    targets: list  # ResolvedTarget
    costs: dict[str, list[list[int]]]  # target -> item -> candidate -> bytes
    fixed: dict[str, int]  # target -> decoder-file bytes besides the choosable tensors
    minimum: dict[str, int]  # target -> decoder-file bytes of the smallest mix
    weights: int  # of the choosable tensors
    base: QuantSettings = field(repr=False)  # the run's settings without a mix

    def worst_costs(self) -> list[list[int]]:
        """Per item and candidate, its largest cost over the targets."""
        return [[max(self.costs[t.name][i][c] for t in self.targets) for c in range(len(item.candidates))]
                for i, item in enumerate(self.items)]

    def settings_for(self, picks: list[int]) -> QuantSettings:
        mix = {item.name: item.candidates[c].label for item, c in zip(self.items, picks)}
        return replace(self.base, mix=mix)


def _predict(ckpt, plan: ModelPlan, settings: QuantSettings, target) -> int:
    from phi3_export.export.onnx.sizes import predict_decoder_bytes

    return sum(predict_decoder_bytes(ckpt.shape, plan, settings, target, ckpt.config).values())


def plan_budget(ckpt, plan: ModelPlan, settings: QuantSettings, targets: list, budget: Budget) -> BudgetPlan:
    """Costs, fixed parts and the budget in bytes; a one-line error when no mix fits."""
    from phi3_export.export.onnx.sizes import tensor_bytes

    if not settings.quantized:
        raise Phi3ExportError(f"{budget.flag}: needs --bits 4 or 8 (a budget chooses among int4 and int8 storages), "
                              f"not --bits {settings.bits}")
    if not targets:
        raise Phi3ExportError(f"{budget.flag}: limits the ONNX model files; add --format onnx with at least one --target")
    items = choosable_tensors(plan, settings)
    costs = {t.name: [[tensor_bytes(item.shape, s, t.target.io_dtype, lookup=item.lookup) for s in item.candidates]
                      for item in items] for t in targets}
    bplan = BudgetPlan(budget, 0, items, targets, costs, {}, {}, sum(item.weights for item in items), settings)
    worst = bplan.worst_costs()
    smallest = [int(np.argmin(row)) for row in worst]
    base = bplan.settings_for(smallest)
    for t in targets:
        bplan.minimum[t.name] = _predict(ckpt, plan, base, t)
        bplan.fixed[t.name] = bplan.minimum[t.name] - sum(costs[t.name][i][c] for i, c in enumerate(smallest))
    if budget.size_bytes is not None:
        bplan.budget_bytes = budget.size_bytes
    else:
        bplan.budget_bytes = math.floor(budget.bits_per_weight * bplan.weights / 8) + max(bplan.fixed.values())
    binding = max(targets, key=lambda t: bplan.minimum[t.name])
    least = bplan.minimum[binding.name]
    if bplan.budget_bytes < least:
        what = "every choosable tensor at its smallest choice (int4-g128 at full width)"
        if budget.size_bytes is not None:
            raise Phi3ExportError(f"{budget.flag}: below the smallest possible decoder, {least / MB:.2f} MB "
                                  f"(target {binding.name}, model.onnx + model.onnx.data, {what})")
        bits = 8 * (least - max(bplan.fixed.values())) / bplan.weights
        raise Phi3ExportError(f"{budget.flag}: below the smallest possible mix, {bits:.3f} bits per weight "
                              f"({least / MB:.2f} MB on target {binding.name}, {what})")
    return bplan


# ---- the knapsack ------------------------------------------------------------------------------------


def knapsack(costs: list[list[int]], errors: list[list[float]], capacity: int, units: int = DP_UNITS) -> list[int] | None:
    """Per item the candidate index minimising the summed error with summed cost <= ``capacity``.

    Exact multiple-choice knapsack over the room above every item's cheapest candidate,
    discretised into ``units`` steps with costs rounded up (so the answer always fits); None
    when even the cheapest candidates do not fit.
    """
    cheapest = [min(row) for row in costs]
    room = capacity - sum(cheapest)
    if room < 0:
        return None
    step = max(1, math.ceil(room / units))
    slots = room // step + 1
    best = np.zeros(slots)  # best[k]: least error with extra cost <= k steps (over the items so far)
    chosen = np.zeros((len(costs), slots), dtype=np.int16)
    for i, (row, errs) in enumerate(zip(costs, errors)):
        new = np.full(slots, np.inf)
        for c, (cost, err) in enumerate(zip(row, errs)):
            w = math.ceil((cost - cheapest[i]) / step)
            if w >= slots:
                continue
            candidate = np.full(slots, np.inf)
            candidate[w:] = best[: slots - w] + err
            better = candidate < new
            new[better] = candidate[better]
            chosen[i, better] = c
        best = new
    picks, k = [], slots - 1
    for i in range(len(costs) - 1, -1, -1):
        c = int(chosen[i, k])
        picks.append(c)
        k -= math.ceil((costs[i][c] - cheapest[i]) / step)
    return picks[::-1]


@dataclass
class Chosen:
    settings: QuantSettings
    predicted: dict[str, int]  # target -> decoder-file bytes
    error: float  # the summed sensitivity of the choice


def choose_mix(ckpt, plan: ModelPlan, bplan: BudgetPlan, errors: dict[str, dict[str, float]]) -> Chosen:
    """The least-error mix whose exact predicted size fits every target.

    The knapsack's additive model misses a few bytes of alignment and graph proto per changed
    tensor; the exact prediction catches that and the room shrinks by the overshoot until it fits
    (the smallest mix always does: ``plan_budget`` checked it).
    """
    worst = bplan.worst_costs()
    err = [[errors[item.name][s.label] for s in item.candidates] for item in bplan.items]
    room = bplan.budget_bytes - max(bplan.fixed.values())
    for _ in range(8):
        picks = knapsack(worst, err, room)
        if picks is None:
            break
        settings = bplan.settings_for(picks)
        predicted = {t.name: _predict(ckpt, plan, settings, t) for t in bplan.targets}
        over = max(predicted.values()) - bplan.budget_bytes
        if over <= 0:
            return Chosen(settings, predicted, float(sum(e[c] for e, c in zip(err, picks))))
        room -= over
    picks = [int(np.argmin(row)) for row in worst]
    settings = bplan.settings_for(picks)
    return Chosen(settings, dict(bplan.minimum), float(sum(e[c] for e, c in zip(err, picks))))


# ---- the manifest's record ----------------------------------------------------------------------


TOLERANCE = 0.01  # |achieved - predicted| / predicted allowed


def manifest_block(bplan: BudgetPlan, chosen: Chosen, achieved: dict[str, int], errors: dict | None = None) -> dict:
    """The manifest's ``size_budget``: budget, prediction and outcome per ONNX target, the counts per
    choice, and each tensor's measured errors (the choice itself is ``settings.mix``)."""
    return {
        "budget_bytes": bplan.budget_bytes,
        **({"bits_per_weight": bplan.budget.bits_per_weight} if bplan.budget.bits_per_weight is not None else {}),
        "label": bplan.budget.label,
        "files": ["model.onnx", "model.onnx.data"],
        "choosable_weights": bplan.weights,
        "fixed_bytes": dict(bplan.fixed),
        "minimum_bytes": dict(bplan.minimum),
        "predicted_bytes": dict(chosen.predicted),
        "achieved_bytes": dict(achieved),
        "counts": dict(sorted(Counter(chosen.settings.mix.values()).items())),
        "sensitivity_sum": float(f"{chosen.error:.6g}"),
        **({"sensitivity": {name: {k: float(f"{v:.4g}") for k, v in e.items()} for name, e in errors.items()}}
           if errors else {}),
    }


def check_achieved(bplan: BudgetPlan, chosen: Chosen, achieved: dict[str, int]) -> None:
    """Every ONNX target within the budget and within 1% of its prediction: else a bug of ours, said loudly."""
    for target, size in achieved.items():
        predicted = chosen.predicted[target]
        if size > bplan.budget_bytes or abs(size - predicted) > TOLERANCE * predicted:
            raise RuntimeError(f"size budget: target {target} came out at {size} bytes, predicted {predicted}, budget "
                               f"{bplan.budget_bytes}: the size model in export/onnx/sizes.py is wrong (a phi3-export bug; "
                               "please report it)")


# ---- the run: measure (or reuse), then choose ------------------------------------------------------


def _cache_key(ckpt, text: str, calibration, options, bplan: BudgetPlan) -> str:
    import hashlib
    import json
    from dataclasses import asdict

    h = hashlib.sha256()
    h.update(ckpt.identity().encode())
    h.update(text.encode())
    items = [(item.name, [s.label for s in item.candidates]) for item in bplan.items]
    h.update(json.dumps([asdict(calibration), asdict(options), bplan.base.symmetric, items], sort_keys=True).encode())
    return h.hexdigest()


def measure_and_choose(ckpt, arch, plan: ModelPlan, bplan: BudgetPlan, text: str, calibration, progress,
                       cache=None) -> tuple[Chosen, dict[str, dict[str, float]]]:
    """Sensitivities on the calibration text (or those ``cache`` recorded for the same inputs), then the mix.

    ``cache``: a JSON file beside the output that keeps the measured errors, so a run resumed
    after an interruption (AWQ, GPTQ) does not measure them again; the caller removes it once
    the output is complete.
    """
    import json
    from pathlib import Path

    from phi3_export.quant.budget_sensitivity import SensitivityOptions, measure_errors

    options = SensitivityOptions(seed=calibration.seed)
    key = _cache_key(ckpt, text, calibration, options, bplan)
    errors = None
    if cache is not None and Path(cache).is_file():
        try:
            doc = json.loads(Path(cache).read_text())
            errors = doc["errors"] if doc.get("key") == key else None
        except (ValueError, KeyError, TypeError):
            errors = None
        if errors is not None:
            progress.message(f"size budget: reusing the sensitivities measured earlier ({Path(cache).name})")
    if errors is None:
        with progress.task("budget", len(plan.decoder.layers) + 1) as task:
            errors = measure_errors(ckpt, arch, plan, text, calibration, bplan.items, options, task)
        if cache is not None:
            Path(cache).write_text(json.dumps({"key": key, "errors": errors}))
    chosen = choose_mix(ckpt, plan, bplan, errors)
    counts = ", ".join(f"{n} {label}" for label, n in sorted(Counter(chosen.settings.mix.values()).items()))
    worst = max(chosen.predicted.values())
    progress.message(f"size budget {bplan.budget.label}: {counts}; predicted {worst / MB:.2f} MB of {bplan.budget_bytes / MB:.2f} MB")
    return chosen, errors


def mix_linear_weights(plan: ModelPlan, settings: QuantSettings) -> dict[str, int]:
    """Weights of the mix's layer linears (not the LM head or table) per choice label."""
    counts: Counter = Counter()
    for item in choosable_tensors(plan, settings):
        if item.kind == "linear":
            counts[settings.storage(item.name, item.role).label] += item.weights
    return dict(sorted(counts.items()))


def checked_mix(plan: ModelPlan, settings: QuantSettings, mix: dict[str, str]) -> QuantSettings:
    """``settings`` with an explicit mix (a previous run's, from its manifest), its names and labels checked."""
    names = {item.name for item in choosable_tensors(plan, settings)}
    label = re.compile(r"^(int4|int8)-g(16|32|64|128|256)$|^fp16$|^fp32$")
    for name, value in mix.items():
        if name not in names:
            raise Phi3ExportError(f"mix: {name!r} is not a tensor a mix can choose for (a quantized linear, the LM head "
                                  "or the embedding table of this model)")
        if not isinstance(value, str) or not label.match(value):
            raise Phi3ExportError(f"mix: {name}: {value!r} is not a storage (int4-g128, int4-g32, int8-g128, fp16, ...)")
    if not settings.quantized:
        raise Phi3ExportError(f"mix: needs --bits 4 or 8, not --bits {settings.bits}")
    return replace(settings, mix=dict(mix))
