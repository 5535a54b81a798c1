"""Streamed calibration shared by the calibrated quantizers (AWQ, GPTQ, AWQ-then-GPTQ).

``calibrated_quantize`` is the one layer loop: the calibration windows are embedded once;
then per decoder layer its tensors are loaded, the float layer runs once on the carried
activations capturing every linear's input (``capture_inputs``), the method's
``process_layer`` edits the weights in place and/or returns codes it already chose, the
layer is stored (codes as given, every other linear by RTN from the edited weights, norms
and biases float), and the float layer's output becomes the next layer's input. With
``request.resume`` the finished layers, their index and the carried activations are
recorded after every layer (``ResumeState``), so an interrupted run continues after its
last finished layer and produces byte for byte what an uninterrupted run does.

A linear fewer than ``options.min_tokens`` calibration tokens reached (a MoE expert the
router rarely picks) is the method's to leave to plain RTN; it reports those names and
they are recorded in the checkpoint's ``awq_rtn_fallback`` (the key the manifest reads).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from phi3_export.arch.plan import DecoderLayer
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.checkpoint.stream import embedded, load_tensors, stream_layers
from phi3_export.errors import Phi3ExportError
from phi3_export.job import Job
from phi3_export.quant.qcheckpoint import QuantizedCheckpointWriter
from phi3_export.quant.request import QuantizeRequest
from phi3_export.quant.rtn import QuantizedTensor
from phi3_export.quant.settings import QuantSettings
from phi3_export.quant.store import check_finite, group_name, store_globals, store_layer_weights


class CalibrationOptions(Protocol):
    samples: int  # windows of calibration text
    seqlen: int  # tokens per window
    seed: int  # draws the windows; per-layer subsampling seeds derive from it


# ---- calibration data ----------------------------------------------------------------------

def calibration_tokens(ckpt: Checkpoint, text: str, options: CalibrationOptions) -> torch.Tensor:
    """[samples, seqlen] token ids: ``samples`` windows of ``text`` at starts drawn with ``seed``."""
    from tokenizers import Tokenizer

    path = ckpt.tokenizer_folder / "tokenizer.json"  # the folder's, or one built from tiktoken ranks
    if not path.is_file():
        raise Phi3ExportError(f"{ckpt.folder}: calibration needs tokenizer.json to tokenize the calibration text")
    ids = torch.tensor(Tokenizer.from_file(str(path)).encode(text).ids, dtype=torch.long)
    if len(ids) < options.seqlen + 1:
        raise Phi3ExportError(f"--calib-text: the calibration text is {len(ids)} tokens, shorter than "
                              f"--calib-seqlen {options.seqlen} (+1)")
    gen = torch.Generator().manual_seed(options.seed)
    starts = torch.randint(0, len(ids) - options.seqlen, (options.samples,), generator=gen)
    return torch.stack([ids[s : s + options.seqlen] for s in starts])


def capture_inputs(module: torch.nn.Module, layer: DecoderLayer, x: torch.Tensor, extra: dict,
                   batch: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every linear's input as [tokens, cols] (a MoE expert's: only the tokens routed to it), and
    the layer's output, running ``module`` on ``x`` [windows, seq, hidden] ``batch`` windows at a time.

    Tokens are in window order, so an input every token reaches views as [windows, seq, cols].
    Linears the layer feeds the very same tensor (q, k and v; an expert's gate and up) get one
    shared tensor object, so ``inputs[a] is inputs[b]`` says they read the same input; treat the
    tensors as read-only."""
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
    # Same tensor objects in every forward call: the same input (ids are stable while ``captured`` holds them).
    keys = {name: tuple(id(p) for p in parts) if parts else (name,) for name, parts in captured.items()}
    inputs: dict[str, torch.Tensor] = {}
    by_key: dict[tuple, torch.Tensor] = {}
    for name in list(captured):
        key = keys[name]
        if key not in by_key:
            parts = captured[name]
            by_key[key] = (torch.cat([p.reshape(-1, columns[name]) for p in parts]) if parts
                           else torch.empty(0, columns[name]))
        inputs[name] = by_key[key]
        captured[name] = []  # each part freed once no other linear's list holds it
    return inputs, y


def subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most ``n`` rows of ``x``, drawn with ``seed`` and kept in their order (all if fewer)."""
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx]


# ---- resume state --------------------------------------------------------------------------

class ResumeState:
    """Finished layers of an interrupted run: the layer files, their index, the activations.

    Files are named by method (``awq_state.json``, ``gptq_activations.safetensors``) and each is
    replaced atomically, so a run killed mid-save leaves the previous layer's state whole."""

    def __init__(self, folder: Path, fingerprint: str, method: str = "awq"):
        self.folder, self.fingerprint, self.method = Path(folder), fingerprint, method
        self.state_path = self.folder / f"{method}_state.json"
        self.activations_path = self.folder / f"{method}_activations.safetensors"

    def load(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        state = json.loads(self.state_path.read_text())
        return state if state.get("fingerprint") == self.fingerprint else None

    def save(self, layers_done: int, tensors: dict, activations: torch.Tensor, rtn_fallback: list[str]) -> None:
        tmp = self.folder / f"{self.method}_activations.tmp"
        save_file({"x": activations.contiguous()}, str(tmp))
        tmp.replace(self.activations_path)
        doc = {"fingerprint": self.fingerprint, "layers_done": layers_done, "tensors": tensors, "rtn_fallback": rtn_fallback}
        tmp = self.folder / f"{self.method}_state.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.state_path)

    def activations(self) -> torch.Tensor:
        return load_file(str(self.activations_path))["x"]

    def clear(self) -> None:
        self.state_path.unlink(missing_ok=True)
        self.activations_path.unlink(missing_ok=True)


def fingerprint(ckpt: Checkpoint, settings: QuantSettings, method: str, options: list[Any], text: str) -> str:
    """What a resumed run must share with the interrupted one: checkpoint, settings, method, options, text."""
    h = hashlib.sha256()
    h.update(ckpt.identity().encode())
    values = [asdict(o) if is_dataclass(o) else o for o in options]
    h.update(json.dumps([method, settings.as_dict(), values], sort_keys=True).encode())
    h.update(text.encode())
    return h.hexdigest()


# ---- the layer loop --------------------------------------------------------------------------

@dataclass
class LayerWork:
    """What ``process_layer`` hands back: codes it chose itself (linear weight name -> codes; the
    loop stores them as they are), and the linears it left to plain RTN for want of tokens."""

    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    rtn_fallback: list[str] = field(default_factory=list)


Tick = Callable[[str], None]
# (weights, inputs, layer, module, extra, tick) -> LayerWork. ``weights``: the layer's tensors
# (float32 copies, edited in place); ``inputs``: capture_inputs' per linear; ``module``: the
# float layer (its own copy of the weights); ``extra``: the layer's keyword inputs (RoPE, mask).
ProcessLayer = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], DecoderLayer, torch.nn.Module, dict, Tick],
                        LayerWork]


def calibrated_quantize(job: Job, out: Path, request: QuantizeRequest, method: str, process_layer: ProcessLayer,
                        layer_steps: Callable[[DecoderLayer], int], meta: dict, options: list[Any]) -> Path:
    """Run ``process_layer`` on every decoder layer with its calibration inputs and store the result.

    ``request.awq`` carries the calibration options (samples, seqlen, seed); ``layer_steps(layer)``
    is the number of ``tick`` calls ``process_layer`` makes (the loop adds one for the capture
    and one for the store); ``meta`` is recorded in quantized.json; ``options`` (with the
    method, settings, config and text) decide whether a recorded state may be resumed.
    """
    ckpt, settings, layers = job.ckpt, job.settings, job.plan.decoder.layers
    calibration: CalibrationOptions = request.awq
    text = request.calibration_text
    if not settings.quantized:
        raise Phi3ExportError(f"--method {method} needs --bits 4 or 8, not {settings.bits}")
    state = ResumeState(out, fingerprint(ckpt, settings, method, options, text), method)
    saved = state.load() if request.resume else None
    # The calibration input is validated before the work folder is made: a bad one leaves nothing behind.
    tokens = None if saved else calibration_tokens(ckpt, text, calibration)
    writer = QuantizedCheckpointWriter(out, {"architecture": job.facts.architecture, "config": ckpt.config,
                                             "settings": settings.as_dict(), **meta})
    extra = job.arch.calibration_inputs(ckpt.config, calibration.seqlen)
    fallback: list[str] = []
    if saved:
        start, x = saved["layers_done"], state.activations()
        writer.tensors, fallback = saved["tensors"], saved.get("rtn_fallback", [])
        job.progress.message(f"{method}: resuming after layer {start - 1}")
    else:
        start = 0
        for stale in out.glob("*.safetensors"):  # a different run's layers: start afresh
            stale.unlink()
        state.clear()
        x = embedded(ckpt, job.plan.decoder, tokens)
        check_finite(job.plan.decoder.embedding, x)  # a NaN row would silently void every layer's search
    # Progress within each layer too: at Phi-3-mini width one layer takes minutes.
    with job.progress.task(method, sum(layer_steps(layer) + 2 for layer in layers[start:])) as task:
        for layer in stream_layers(ckpt, layers[start:]):
            def tick(what: str, index: int = layer.index) -> None:
                task.advance(f"layer {index}: {what}")

            weights = load_tensors(ckpt, layer.tensors())
            for name, tensor in weights.items():  # named before any search: a fold would carry a NaN into the norm
                check_finite(name, tensor)
            module = job.arch.loaded_layer(ckpt.config, layer, weights)  # a copy: the method edits ``weights``
            inputs, y = capture_inputs(module, layer, x, extra)
            del x
            tick("captured inputs")
            work = process_layer(weights, inputs, layer, module, extra, tick)
            fallback += work.rtn_fallback
            del inputs, module
            for group, blocks in layer.tensor_groups():
                store_layer_weights(writer, blocks, weights, work.quantized, ckpt, settings)
                writer.flush(group_name(layer, group))
            del weights, work
            x = y
            if request.resume:
                state.save(layer.index + 1, writer.tensors, x, fallback)
            tick("stored")
    writer.meta["awq_rtn_fallback"] = fallback
    store_globals(writer, ckpt, job.plan.decoder, settings)
    writer.close()
    state.clear()
    return out
