"""Activation-aware weight quantization (AWQ, arXiv 2306.00978), on the CPU, one layer at a time.

Per decoder layer: run it once on the calibration activations, capturing each linear's
input; for every scaling group the architecture declares, grid-search alpha in [0, 1) for
s = mean|x|**alpha (normalised), scoring the group's output error after quantize-dequantize;
fold 1/s into the preceding norm (or rows of the preceding linear) and s into the group's
columns; then search a clip ratio per output row and block. The layer is then quantized by
the same RTN and written to the quantized checkpoint, so exporters see no difference.

The algorithm never names a model: groups, fused row layouts and the layer module all come
from the architecture module. Under GQA the V->o_proj scale is one value per KV-head
channel, repeated to the query heads that share it, so folding stays exact.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from phi3_export.arch.base import Architecture, ScalingGroup
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.errors import Phi3ExportError
from phi3_export.memory import release_freed_memory
from phi3_export.progress import Progress
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.rtn import quantize_rtn
from phi3_export.quant.settings import QuantSettings
from phi3_export.recipes.schema import ModelFacts


@dataclass(frozen=True)
class AwqOptions:
    samples: int = 32
    seqlen: int = 256
    seed: int = 0
    alpha_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    score_tokens: int = 4096  # tokens used to score a scale candidate
    clip_tokens: int = 256  # tokens used to score a clip ratio


# ---- scale folding: exact in floating point, tested on its own ------------------------------

def expand_scale(group: ScalingGroup, s: torch.Tensor, facts: ModelFacts) -> torch.Tensor:
    """Scale per input column of the group's linears, from the searched per-channel scale."""
    if not group.kv_shared:
        return s
    # One scale per KV-head channel; query head h reads KV head h // n_rep (transformers' repeat_kv).
    n_rep = facts.num_heads // facts.num_kv_heads
    return s.view(facts.num_kv_heads, 1, facts.head_dim).expand(-1, n_rep, -1).reshape(-1)


def fold_scale(weights: dict[str, torch.Tensor], group: ScalingGroup, s: torch.Tensor, arch: type[Architecture],
               facts: ModelFacts) -> None:
    """W[:, c] *= s[c] for the group's linears and 1/s into ``prev``, in place; output unchanged."""
    full = expand_scale(group, s, facts)
    for role in group.linears:
        weights[role].mul_(full[None, :])
    prev = weights[group.prev]
    if group.prev_rows == "all":
        prev.div_(full if prev.ndim == 1 else full[:, None])
    else:
        prev[arch.rows_of(group.prev, group.prev_rows, facts)].div_(s[:, None])


def channel_stat(group: ScalingGroup, x: torch.Tensor, facts: ModelFacts) -> torch.Tensor:
    """mean |x| per scalable channel (per KV-head channel for a kv_shared group)."""
    return _per_scalable_channel(group, x.abs().mean(dim=0), facts)


def weight_stat(group: ScalingGroup, w: torch.Tensor, block: int, facts: ModelFacts) -> torch.Tensor:
    """mean over rows of |w| normalised by its block's max: how large each input channel's weights are."""
    rows, cols = w.shape
    blocks = w.abs().view(rows, -1, block) if cols % block == 0 else w.abs()[:, None, :]
    normalised = (blocks / blocks.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(rows, cols)
    return _per_scalable_channel(group, normalised.mean(dim=0), facts)


def _per_scalable_channel(group: ScalingGroup, stat: torch.Tensor, facts: ModelFacts) -> torch.Tensor:
    if group.kv_shared:
        n_rep = facts.num_heads // facts.num_kv_heads
        stat = stat.view(facts.num_kv_heads, n_rep, facts.head_dim).mean(dim=1).reshape(-1)
    return stat


# ---- searches ----------------------------------------------------------------------------------

def _fake_quant(w: torch.Tensor, settings: QuantSettings, bits: int) -> torch.Tensor:
    return quantize_rtn(w, bits, settings.block_size, settings.symmetric).dequantize()


def _output_error(x: torch.Tensor, w_ref: torch.Tensor, w_new: torch.Tensor, chunk: int = 1024) -> float:
    err = 0.0
    diff = (w_new - w_ref).T
    for start in range(0, x.shape[0], chunk):
        err += (x[start : start + chunk] @ diff).pow(2).sum().item()
    return err / (x.shape[0] * w_ref.shape[0])


def search_scale(group: ScalingGroup, x: torch.Tensor, weights: list[torch.Tensor], settings: QuantSettings, bits: int,
                 facts: ModelFacts, grid: int, score=None) -> tuple[torch.Tensor, float]:
    """Best s over the alpha grid; ``score(candidate_weights)`` defaults to the linears' output error."""
    w = torch.cat(weights, dim=0)
    if score is None:
        def score(candidate: list[torch.Tensor]) -> float:
            return _output_error(x, w, torch.cat(candidate, dim=0))
    stat = channel_stat(group, x, facts)
    # Activation and weight magnitudes both (AutoAWQ's "duo scaling"): s = x^a / w^(1-a).
    w_stat = weight_stat(group, w, settings.block_size, facts)
    # Start from no scaling at all, so the search never does worse than plain RTN on its score.
    best_s, best_alpha = torch.ones_like(stat), None
    best_err = score([_fake_quant(wi, settings, bits) for wi in weights])
    for k in range(grid):
        alpha = k / grid
        s = (stat.pow(alpha) / w_stat.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        full = expand_scale(group, s, facts)
        err = score([_fake_quant(wi * full[None, :], settings, bits) / full[None, :] for wi in weights])
        if err < best_err:
            best_s, best_err, best_alpha = s, err, alpha
    return best_s, best_alpha


def module_scorer(layer: torch.nn.Module, group: ScalingGroup, arch: type[Architecture], x: torch.Tensor, extra: dict):
    """Scores candidate weights of ``group`` by the output of its ``inspect`` submodule on ``x``."""
    module = layer.get_submodule(group.inspect)
    linears = [layer.get_submodule(arch.module_path(role)) for role in group.linears]
    kwargs = {k: v for k, v in extra.items() if k in ("position_embeddings", "attention_mask")} if group.inspect != "mlp" else {}

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = module(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    reference = run()

    def score(candidate: list[torch.Tensor]) -> float:
        originals = [lin.weight.data for lin in linears]
        for lin, w in zip(linears, candidate):
            lin.weight.data = w
        try:
            return (run() - reference).pow(2).mean().item()
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data = w

    return score


def search_clip(x: torch.Tensor, w: torch.Tensor, settings: QuantSettings, bits: int, options: AwqOptions,
                row_chunk: int = 256) -> torch.Tensor:
    """Per (row, block) shrink of the quantization range minimising that block's output error."""
    rows, cols = w.shape
    block = settings.block_size
    if cols % block:
        return w
    nb = cols // block
    xb = x.view(x.shape[0], nb, block)
    out = torch.empty_like(w)
    ratios = [1 - options.max_shrink * k / options.clip_grid for k in range(options.clip_grid)]
    for r0 in range(0, rows, row_chunk):
        wb = w[r0 : r0 + row_chunk].view(-1, nb, block)
        ref = torch.einsum("tgb,ogb->tog", xb, wb)
        if settings.symmetric:
            hi = wb.abs().amax(dim=-1, keepdim=True)
            lo = -hi
        else:
            hi, lo = wb.amax(dim=-1, keepdim=True), wb.amin(dim=-1, keepdim=True)
        best_err = torch.full(wb.shape[:2], math.inf)
        best = wb.clone()
        for ratio in ratios:
            clipped = torch.maximum(torch.minimum(wb, hi * ratio), lo * ratio)
            q = _fake_quant(clipped.reshape(-1, cols), settings, bits).view_as(wb)
            err = (torch.einsum("tgb,ogb->tog", xb, q) - ref).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], clipped, best)
        out[r0 : r0 + row_chunk] = best.view(-1, cols)
    return out


# ---- calibration data and resume state ---------------------------------------------------

def calibration_tokens(ckpt: Checkpoint, text: str, options: AwqOptions) -> torch.Tensor:
    from tokenizers import Tokenizer

    path = ckpt.folder / "tokenizer.json"
    if not path.is_file():
        raise Phi3ExportError(f"{ckpt.folder}: AWQ needs tokenizer.json to tokenize the calibration text")
    ids = torch.tensor(Tokenizer.from_file(str(path)).encode(text).ids, dtype=torch.long)
    if len(ids) < options.seqlen + 1:
        raise Phi3ExportError(f"calibration text is {len(ids)} tokens, shorter than --calib-seqlen {options.seqlen}")
    gen = torch.Generator().manual_seed(options.seed)
    starts = torch.randint(0, len(ids) - options.seqlen, (options.samples,), generator=gen)
    return torch.stack([ids[s : s + options.seqlen] for s in starts])


class ResumeState:
    """Finished layers of an interrupted AWQ run: the layer files, their index, the activations."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.state_path = self.folder / "awq_state.json"

    def load(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        return state if state.get("fingerprint") == self.fingerprint else None

    def save(self, layers_done: int, tensors: dict, activations: torch.Tensor) -> None:
        save_file({"x": activations.contiguous()}, str(self.folder / "awq_activations.tmp"))
        (self.folder / "awq_activations.tmp").replace(self.folder / "awq_activations.safetensors")
        doc = {"fingerprint": self.fingerprint, "layers_done": layers_done, "tensors": tensors}
        (self.folder / "awq_state.tmp").write_text(json.dumps(doc))
        (self.folder / "awq_state.tmp").replace(self.state_path)

    def activations(self) -> torch.Tensor:
        return load_file(str(self.folder / "awq_activations.safetensors"))["x"]

    def clear(self) -> None:
        for name in ("awq_state.json", "awq_activations.safetensors"):
            (self.folder / name).unlink(missing_ok=True)


def fingerprint(ckpt: Checkpoint, settings: QuantSettings, options: AwqOptions, text: str) -> str:
    h = hashlib.sha256()
    h.update((ckpt.folder / "config.json").read_bytes())
    h.update(json.dumps([settings.as_dict(), asdict(options)], sort_keys=True).encode())
    h.update(text.encode())
    return h.hexdigest()


# ---- the layer loop ---------------------------------------------------------------------

def _capture_inputs(layer: torch.nn.Module, arch: type[Architecture], x: torch.Tensor, extra: dict,
                    batch: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    captured: dict[str, list[torch.Tensor]] = {role: [] for role in arch.layer_linears}
    hooks = [
        layer.get_submodule(arch.module_path(role)).register_forward_hook(
            lambda _m, inputs, _out, role=role: captured[role].append(inputs[0].detach())
        )
        for role in arch.layer_linears
    ]
    try:
        with torch.no_grad():
            y = torch.cat([layer(x[i : i + batch], **extra) for i in range(0, x.shape[0], batch)])
    finally:
        for hook in hooks:
            hook.remove()
    return {role: torch.cat(parts) for role, parts in captured.items()}, y


def _subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx]


def awq_layer(weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], arch: type[Architecture],
              facts: ModelFacts, settings: QuantSettings, options: AwqOptions, seed: int,
              layer: torch.nn.Module | None = None, extra: dict | None = None) -> dict[str, float]:
    """Scale and clip one layer's weights in place; returns the chosen alpha per group.

    ``inputs`` holds each linear's captured input as [samples, seqlen, channels]; ``layer``
    (the float layer module) lets groups with ``inspect`` be scored by a submodule's output.
    """
    bits = settings.bits
    input_scale: dict[str, torch.Tensor] = {}
    alphas = {}
    flat = {role: x.reshape(-1, x.shape[-1]) for role, x in inputs.items()}
    for group in arch.scaling_groups:
        x = _subsample(flat[group.linears[0]], options.score_tokens, seed)
        score = None
        if group.inspect and layer is not None:
            samples = max(1, options.score_tokens // inputs[group.linears[0]].shape[1])
            score = module_scorer(layer, group, arch, inputs[group.linears[0]][:samples], extra or {})
        s, alpha = search_scale(group, x, [weights[r] for r in group.linears], settings, bits, facts, options.alpha_grid, score)
        fold_scale(weights, group, s, arch, facts)
        for role in group.linears:
            input_scale[role] = expand_scale(group, s, facts)
        alphas[f"{group.prev}->{'+'.join(group.linears)}"] = alpha
    if options.clip:
        for role in arch.layer_linears:
            x = _subsample(flat[role], options.clip_tokens, seed + 1)
            if role in input_scale:
                x = x / input_scale[role][None, :]
            skipped = arch.no_clip.get(role, ())
            for part in arch.fused.get(role, (None,)) if skipped else (None,):
                if part in skipped:
                    continue
                rows = arch.rows_of(role, part, facts) if part else slice(None)
                weights[role][rows] = search_clip(x, weights[role][rows], settings, bits, options)
    return alphas


def awq_quantize_checkpoint(
    ckpt: Checkpoint, arch: type[Architecture], facts: ModelFacts, settings: QuantSettings, out: Path,
    progress: Progress, request,
) -> Path:
    """AWQ into ``out``; with ``request.resume``, finished layers there are kept and reused."""
    from phi3_export.quant.stage import quantize_rows, store_globals

    options: AwqOptions = request.awq or AwqOptions()
    calibration_text = request.calibration_text

    if not settings.quantized:
        raise Phi3ExportError(f"--method awq needs --bits 4 or 8, not {settings.bits}")
    meta = {"architecture": facts.architecture, "config": ckpt.config, "settings": settings.as_dict(),
            "awq": asdict(options)}
    writer = QuantizedCheckpointWriter(out, meta)
    state = ResumeState(out, fingerprint(ckpt, settings, options, calibration_text))
    saved = state.load() if request.resume else None
    extra = arch.calibration_inputs(ckpt.config, options.seqlen)
    if saved:
        start, x = saved["layers_done"], state.activations()
        writer.tensors = saved["tensors"]
        progress.message(f"awq: resuming after layer {start - 1}")
    else:
        start = 0
        for stale in out.glob("*.safetensors"):  # a different run's layers: start afresh
            stale.unlink()
        state.clear()
        tokens = calibration_tokens(ckpt, calibration_text, options)
        x = ckpt.gather_rows(arch.embed, tokens)  # only the calibration tokens' rows, never the whole table
    with progress.task("awq", facts.num_layers - start) as task:
        for i in range(start, facts.num_layers):
            weights = {role: ckpt.tensor(arch.layer_tensor(role, i)) for role in (*arch.layer_norms, *arch.layer_linears)}
            layer = arch.loaded_layer(ckpt.config, i, weights)  # a copy: the search edits ``weights``
            inputs, y = _capture_inputs(layer, arch, x, extra)
            awq_layer(weights, inputs, arch, facts, settings, options, seed=options.seed + i, layer=layer, extra=extra)
            del inputs, layer
            for role in arch.layer_norms:
                name = arch.layer_tensor(role, i)
                writer.add_float(name, weights[role].to(ckpt.torch_dtype(name)), role)
            for role in arch.layer_linears:
                precision = settings.precision(role)
                name = arch.layer_tensor(role, i)
                if precision in ("int4", "int8"):
                    writer.add_quantized_rows(name, quantize_rows(weights[role], int(precision[3:]), settings), role)
                else:
                    writer.add_float(name, weights[role], role)
            writer.flush(f"layer-{i:03d}")
            del weights
            ckpt.close()  # unmap the shards read so far (see rtn_quantize_checkpoint)
            release_freed_memory()
            x = y
            if request.resume:
                state.save(i + 1, writer.tensors, x)
            task.advance(f"layer {i}")
    store_globals(writer, ckpt, arch, facts, settings)
    writer.close()
    state.clear()
    return out
