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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from phi3_export.arch.plan import DecoderLayer
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.checkpoint.stream import embedded, load_tensors, stream_layers
from phi3_export.errors import Phi3ExportError
from phi3_export.job import Job
from phi3_export.quant.awq_search import AwqOptions, expand_scale, fold_scale, module_scorer, search_clip, search_scale
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.request import QuantizeRequest
from phi3_export.quant.settings import QuantSettings
from phi3_export.quant.store import check_finite, group_name, linear_storage, store_globals, store_weights

# ---- calibration data and resume state ---------------------------------------------------

def calibration_tokens(ckpt: Checkpoint, text: str, options: AwqOptions) -> torch.Tensor:
    from tokenizers import Tokenizer

    path = ckpt.tokenizer_folder / "tokenizer.json"  # the folder's, or one built from tiktoken ranks
    if not path.is_file():
        raise Phi3ExportError(f"{ckpt.folder}: AWQ needs tokenizer.json to tokenize the calibration text")
    ids = torch.tensor(Tokenizer.from_file(str(path)).encode(text).ids, dtype=torch.long)
    if len(ids) < options.seqlen + 1:
        raise Phi3ExportError(f"--calib-text: the calibration text is {len(ids)} tokens, shorter than "
                              f"--calib-seqlen {options.seqlen} (+1)")
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

    def save(self, layers_done: int, tensors: dict, activations: torch.Tensor, rtn_fallback: list[str]) -> None:
        save_file({"x": activations.contiguous()}, str(self.folder / "awq_activations.tmp"))
        (self.folder / "awq_activations.tmp").replace(self.folder / "awq_activations.safetensors")
        doc = {"fingerprint": self.fingerprint, "layers_done": layers_done, "tensors": tensors, "rtn_fallback": rtn_fallback}
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

def _capture_inputs(module: torch.nn.Module, layer: DecoderLayer, x: torch.Tensor, extra: dict,
                    batch: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every linear's input (a MoE expert's: only the tokens routed to it), and the layer's output."""
    linears = layer.linears()
    captured: dict[str, list[torch.Tensor]] = {lin.weight: [] for lin in linears}
    hooks = [
        module.get_submodule(layer.module_path(lin.weight)).register_forward_hook(
            lambda _m, inputs, _out, name=lin.weight: captured[name].append(inputs[0].detach())
        )
        for lin in linears
    ]
    try:
        with torch.no_grad():
            y = torch.cat([module(x[i : i + batch], **extra) for i in range(0, x.shape[0], batch)])
    finally:
        for hook in hooks:
            hook.remove()
    columns = {lin.weight: lin.shape[1] for lin in linears}
    return {name: torch.cat([p.reshape(-1, columns[name]) for p in parts]) if parts else torch.empty(0, columns[name])
            for name, parts in captured.items()}, y


def _subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx]


@dataclass
class LayerResult:
    alphas: dict[str, float | None]
    rtn_fallback: list[str]  # linears left to plain RTN: too few calibration tokens reached them


def awq_layer(weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], layer: DecoderLayer,
              settings: QuantSettings, options: AwqOptions, seed: int, module: torch.nn.Module | None = None,
              extra: dict | None = None, tick=None) -> LayerResult:
    """Scale and clip one layer's weights in place.

    ``inputs`` holds each linear's captured input as [tokens, channels] (tokens of the
    calibration windows in order, so windows of ``options.seqlen`` for every linear the whole
    sequence reaches); ``module`` (the float layer) lets groups with ``inspect`` be scored by a
    submodule's output. A group whose input fewer than ``options.min_tokens`` calibration tokens
    reached (a MoE expert the router rarely picks) is not searched, nor are such linears clipped:
    they keep plain RTN rounding (after any shared scale folded into their input, which is exact).
    ``tick(what)`` is called after each group's search and after the clip search (progress).
    """
    tick = tick or (lambda _what: None)
    input_scale: dict[str, torch.Tensor] = {}
    result = LayerResult({}, [])
    starved = {name for name, x in inputs.items() if x.shape[0] < options.min_tokens}
    for group in layer.scaling_groups:
        source = (group.also_scaled or group.linears)[0].weight  # a linear reading exactly the group's input
        if source in starved:
            tick(f"{group.label} (too few tokens)")
            continue
        x = _subsample(inputs[source], options.score_tokens, seed)
        score = None
        if group.inspect and module is not None:
            windows = inputs[source].view(-1, options.seqlen, inputs[source].shape[-1])
            samples = max(1, options.score_tokens // options.seqlen)
            score = module_scorer(module, layer, group, windows[:samples], extra or {})
        s, alpha = search_scale(group, x, [weights[lin.weight] for lin in group.linears],
                                [linear_storage(lin, settings) for lin in group.linears], options.alpha_grid, score)
        fold_scale(weights, group, s)
        for lin in group.linears:
            input_scale[lin.weight] = expand_scale(group, s)
        result.alphas[group.label] = alpha
        tick(group.label)
    result.rtn_fallback = sorted(starved)
    if options.clip:
        for lin in layer.linears():
            if not lin.quantize or lin.weight in starved:
                continue
            x = _subsample(inputs[lin.weight], options.clip_tokens, seed + 1)
            if lin.weight in input_scale:
                x = x / input_scale[lin.weight][None, :]
            for rows in lin.clipped_rows():
                weights[lin.weight][rows] = search_clip(x, weights[lin.weight][rows], linear_storage(lin, settings), options)
    tick("clip search")
    return result


def _layer_steps(layer: DecoderLayer) -> int:
    """Progress steps of one layer: capture, each scaling group, clip search, store."""
    return len(layer.scaling_groups) + 3


def awq_quantize_checkpoint(job: Job, out: Path, request: QuantizeRequest) -> Path:
    """AWQ into ``out``; with ``request.resume``, finished layers there are kept and reused."""
    ckpt, settings, layers = job.ckpt, job.settings, job.plan.decoder.layers
    options: AwqOptions = request.awq or AwqOptions()
    calibration_text = request.calibration_text

    if not settings.quantized:
        raise Phi3ExportError(f"--method awq needs --bits 4 or 8, not {settings.bits}")
    meta = {"architecture": job.facts.architecture, "config": ckpt.config, "settings": settings.as_dict(),
            "awq": asdict(options)}
    state = ResumeState(out, fingerprint(ckpt, settings, options, calibration_text))
    saved = state.load() if request.resume else None
    # The calibration input is validated before the work folder is made: a bad one leaves nothing behind.
    tokens = None if saved else calibration_tokens(ckpt, calibration_text, options)
    writer = QuantizedCheckpointWriter(out, meta)
    extra = job.arch.calibration_inputs(ckpt.config, options.seqlen)
    fallback: list[str] = []
    if saved:
        start, x = saved["layers_done"], state.activations()
        writer.tensors, fallback = saved["tensors"], saved.get("rtn_fallback", [])
        job.progress.message(f"awq: resuming after layer {start - 1}")
    else:
        start = 0
        for stale in out.glob("*.safetensors"):  # a different run's layers: start afresh
            stale.unlink()
        state.clear()
        x = embedded(ckpt, job.plan.decoder, tokens)
        check_finite(job.plan.decoder.embedding, x)  # a NaN row would silently void every layer's search
    # Progress within each layer too: at Phi-3-mini width one layer takes minutes.
    with job.progress.task("awq", sum(_layer_steps(layer) for layer in layers[start:])) as task:
        for layer in stream_layers(ckpt, layers[start:]):
            def tick(what: str, index: int = layer.index) -> None:
                task.advance(f"layer {index}: {what}")

            weights = load_tensors(ckpt, layer.tensors())
            module = job.arch.loaded_layer(ckpt.config, layer, weights)  # a copy: the search edits ``weights``
            inputs, y = _capture_inputs(module, layer, x, extra)
            tick("captured inputs")
            done = awq_layer(weights, inputs, layer, settings, options, seed=options.seed + layer.index, module=module,
                             extra=extra, tick=tick)
            fallback += done.rtn_fallback
            del inputs, module
            for group, blocks in layer.tensor_groups():
                store_weights(writer, blocks, weights, ckpt, settings)
                writer.flush(group_name(layer, group))
            del weights
            x = y
            if request.resume:
                state.save(layer.index + 1, writer.tensors, x, fallback)
            tick("stored")
    writer.meta["awq_rtn_fallback"] = fallback
    store_globals(writer, ckpt, job.plan.decoder, settings)
    writer.close()
    state.clear()
    return out
