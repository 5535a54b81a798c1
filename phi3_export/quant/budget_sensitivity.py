"""How much each choosable tensor at each candidate storage costs in KL divergence, on calibration text.

The size budget (quant/budget.py) sums these errors and minimises the sum under the budget, so
they must share one unit: each is an estimate of the mean per-token KL divergence of the model's
next-token distribution that quantizing that tensor alone (RTN quantize-dequantize at the
candidate's bits, block size and symmetry) adds, second order in the perturbation:

- the LM head (or a tied table's head side): ``delta z`` is the change of the logits, and
  ``KL ~ 1/2 (E_p[dz^2] - E_p[dz]^2)`` with ``p`` the float model's next-token distribution;
- a decoder-layer linear: ``delta_t`` is the change of its sublayer's output at token ``t``,
  i.e. what it adds to the residual stream. The residual stream carries it to the final norm,
  so it is costed there: ``KL_t ~ kappa_t |delta_t|^2`` where ``kappa_t`` is the mean KL per
  unit squared perturbation of the final residual in a random direction,
  ``kappa_t = tr(A^T F A) / (2 d)``, ``A = logits_scale W_head diag(gamma) / s_t`` (``s_t``
  the final norm's divisor at that token, ``gamma`` its weight) and ``F = diag(p) - p p^T``.
  Per token and exact, from one pass over the head: ``tr(A^T F A) = (sum_v p_v m_v -
  |gamma (W^T p)|^2) / s_t^2`` with ``m_v = sum_k W_vk^2 gamma_k^2``. A linear feeding a scaling
  group's ``inspect`` module (qkv -> attention, gate_up -> MLP) is scored by running that
  module with the linear swapped (attention over a whole window: it is causal); a linear whose
  output *is* the sublayer's (o_proj, down_proj) by ``x (W_q - W)^T`` on its captured input;
- the untied embedding (or a tied table's lookup side): ``delta_t`` is the change of the
  embedded token (times the plan's embedding scale): the residual stream at layer 0.

That first-order model leaves out later layers' reaction to a perturbation (they read the
residual through their norms; on SmolLM2 layer 0 grows an embedding perturbation ~100x) and the
direction of ``delta`` relative to the head (taken as isotropic). Both are measured on one
calibration window run a second time with every choosable tensor at int4-g128 (the *perturbed
stream*, ``measure_errors``): a per-layer gain and one direction factor multiply the residual
costs. Errors of different tensors are taken to add, which is what the knapsack needs. Measured
against onnxruntime (benchmarks/bench_budget.py), the summed estimate of a whole mix is
0.65-0.82x its actual mean KLD, and without the perturbed stream the chosen mixes were worse
(SmolLM2 at 90/105/123 MB: KLD 0.298/0.223/0.098 against 0.240/0.149/0.062 with it).

One token sample serves every tensor (``score_tokens`` tokens of the carried windows; the
attention scores use the first window), so ``kappa`` is needed only there. Cost per layer: the
float layer runs once over ``windows`` calibration windows (``capture_inputs``, as AWQ does) and
twice over the perturbed window; each candidate costs one attention pass over a window (qkv), one
MLP pass over the sample (gate_up) or one matmul (o, down). At the end the LM head is read twice
for ``p`` and ``kappa``, once for the perturbed window and once per candidate. At Phi-3-mini width
16-26 CPU-seconds per layer (about 8-13 s on two free cores) and 2.5 GB of anonymous memory
(benchmarks/bench_budget.py --cost); one layer's weights (plus their int4-g128 copies) and
``windows x seqlen x hidden`` activations are in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from phi3_export.arch.plan import DecoderLayer, ModelPlan, Norm
from phi3_export.checkpoint.stream import embedded, load_tensors, stream_layers
from phi3_export.quant.budget import Choosable
from phi3_export.quant.calibrate import calibration_tokens, capture_inputs
from phi3_export.quant.settings import Storage

HEAD_ROWS = 4096  # LM-head rows read and multiplied at a time
PROBE = "int4-g128"  # the storage the perturbed stream quantizes every choosable tensor at


@dataclass(frozen=True)
class SensitivityOptions:
    windows: int = 4  # calibration windows carried through the layers (at most --calib-samples)
    score_tokens: int = 256  # sampled tokens every linear, the embedding and the head are scored on
    seed: int = 0
    propagate: bool = True  # measure per-layer gains and the direction factor on a perturbed window


def fake_quant(w: torch.Tensor, bits: int, block: int, symmetric: bool) -> torch.Tensor:
    """``quantize_rtn(w, ...).dequantize()``, bit for bit, in fewer passes (no codes kept): 5-7x faster."""
    rows, cols = w.shape
    if cols % block:
        w = torch.nn.functional.pad(w, (0, block - cols % block))
    wb = w.reshape(rows, -1, block)
    wmin, wmax = torch.aminmax(wb, dim=-1)
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.where(wmax.abs() >= wmin.abs(), wmax, wmin).div_(-half)
    else:
        wmin.clamp_(max=0)
        wmax.clamp_(min=0)
        scale = (wmax - wmin).div_(levels)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = half if symmetric else torch.round(-wmin / safe).clamp_(0, levels)[..., None]
    q = torch.div(wb, safe[..., None]).round_().add_(zero).clamp_(0, levels).sub_(zero).mul_(scale[..., None])
    return q.reshape(rows, -1)[:, :cols]


def dequantized(w: torch.Tensor, storage: Storage) -> torch.Tensor:
    """``w`` after RTN quantize-dequantize at ``storage`` (float storages: ``w`` itself)."""
    return fake_quant(w, storage.bits, storage.block_size, storage.symmetric) if storage.quantized else w


@dataclass
class Perturbation:
    """Squared residual-stream perturbations |delta_t|^2 per candidate, at ``tokens`` (flat indices)."""

    tokens: torch.Tensor
    squared: dict[str, torch.Tensor]  # storage label -> [len(tokens)] (float storages: absent, error 0)


def _squared(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(-1, delta.shape[-1]).double().pow(2).sum(-1)


# ---- per layer --------------------------------------------------------------------------------


def _module_runner(module: torch.nn.Module, kwargs: dict, probe: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            result = module(probe, **kwargs)
        return result[0] if isinstance(result, tuple) else result

    return run


def layer_perturbations(module: torch.nn.Module, layer: DecoderLayer, x: torch.Tensor, extra: dict, items: list[Choosable],
                        sample: torch.Tensor, probes: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, Perturbation], torch.Tensor]:
    """This layer's choosable linears' perturbations of the residual stream, and the layer's float output
    (``module``: the float layer, whose own weights are read and put back).

    ``probes``, when given, receives each linear's weight at ``PROBE`` (for the perturbed stream)."""
    inputs, y = capture_inputs(module, layer, x, extra)
    seqlen = x.shape[1]
    window = torch.arange(seqlen)  # attention is causal: scored on the whole first window
    inspect = {lin.weight: group for group in layer.scaling_groups if group.inspect for lin in group.linears}
    sublayer_outputs = {layer.attention.o.weight, *(() if not hasattr(layer.mlp, "down") else (layer.mlp.down.weight,))}
    out: dict[str, Perturbation] = {}
    references: dict[str, torch.Tensor] = {}
    for item in items:
        w = module.get_submodule(layer.module_path(item.name)).weight.data
        quantized = [s for s in item.candidates if s.quantized]
        group = inspect.get(item.name)
        if group is not None:
            windowed = group.inspect == layer.attention.module
            source = inputs[group.linears[0].weight]
            tokens = window if windowed else sample
            probe = source[:seqlen][None] if windowed else source[sample][None]
            wants = ("position_embeddings", "attention_mask") if windowed else ()
            run = _module_runner(module.get_submodule(group.inspect), {k: v for k, v in extra.items() if k in wants}, probe)
            if group.inspect not in references:
                references[group.inspect] = run()
            target = module.get_submodule(layer.module_path(item.name))
            original = target.weight.data
            squared = {}
            for storage in quantized:
                target.weight.data = dequantized(w, storage)
                if probes is not None and storage.label == PROBE:
                    probes[item.name] = target.weight.data
                try:
                    squared[storage.label] = _squared(run() - references[group.inspect])
                finally:
                    target.weight.data = original
            out[item.name] = Perturbation(tokens, squared)
            continue
        xs = inputs[item.name]
        if xs.shape[0] != x.shape[0] * seqlen or item.name not in sublayer_outputs:
            raise ValueError(f"{item.name}: neither feeds an inspected module nor writes the residual stream; "
                             "the size budget cannot cost it")  # no plan has one today
        xs = xs[sample]
        reference = xs @ w.T
        squared = {}
        for storage in quantized:
            wq = dequantized(w, storage)
            if probes is not None and storage.label == PROBE:
                probes[item.name] = wq
            squared[storage.label] = _squared(xs @ wq.T - reference)
        out[item.name] = Perturbation(sample, squared)
    return out, y


# ---- the final norm and the LM head ---------------------------------------------------------------


def _norm_divisor(norm: Norm, x: torch.Tensor) -> torch.Tensor:
    """Per token, ``s`` with norm(x) ~ gamma * x / s (RMSNorm: the rms; LayerNorm: the std)."""
    if norm.kind == "rms":
        return torch.sqrt(x.pow(2).mean(-1) + norm.eps)
    return torch.sqrt(x.var(-1, unbiased=False) + norm.eps)


class Head:
    """The float LM head at the final hidden states of the scored tokens: ``p``, ``kappa``, and
    the KL a quantized head adds. Reads the head in row blocks (twice for ``p``, once per candidate)."""

    def __init__(self, ckpt, plan: ModelPlan, x: torch.Tensor):
        decoder = plan.decoder
        self.ckpt, self.decoder, self.head = ckpt, decoder, decoder.lm_head
        norm = load_tensors(ckpt, decoder.final_norm.tensors())
        self.norm = norm
        self.h = self._normed(x)
        gamma2 = norm[decoder.final_norm.weight].double().pow(2)
        self.vocab = ckpt.shape(self.head.weight)[0]
        self.bias = ckpt.tensor(self.head.bias) if self.head.bias else None
        logits = torch.cat([self._logits(block, start) for start, block in self._blocks()], dim=1)
        if decoder.masked_ids:
            logits[:, list(decoder.masked_ids)] = -torch.inf
        # float32 log-probabilities only ([scored tokens, vocab]: 65 MB at Phi-3-mini's 32064);
        # probabilities are taken per row block in float64
        self.logp = torch.log_softmax(logits, dim=-1)
        del logits
        # kappa_t = (sum_v p_v m_v - |gamma (W^T p)|^2) / (2 d s_t^2), times logits_scale^2
        pm = torch.zeros(x.shape[0], dtype=torch.float64)
        wp = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
        for start, block in self._blocks():
            b = block.double()
            p = self._p(slice(None), start, block.shape[0])
            pm += p @ (b.pow(2) @ gamma2)
            wp += p @ b
        s = _norm_divisor(decoder.final_norm, x).double()
        trace = (pm - (wp.pow(2) * gamma2).sum(-1)).clamp(min=0) / s.pow(2)
        self.kappa = trace * decoder.logits_scale**2 / (2 * x.shape[1])

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        from phi3_export.validate.reference import torch_norm

        with torch.no_grad():
            return torch_norm(self.decoder.final_norm, x, self.norm)

    def kl_of(self, x: torch.Tensor, rows: torch.Tensor) -> float:
        """Mean exact KL(p || p') at the scored tokens ``rows``, p' from other final residuals ``x`` there."""
        keep = self.h
        self.h = self._normed(x)
        try:
            logits = torch.cat([self._logits(block, start) for start, block in self._blocks()], dim=1)
        finally:
            self.h = keep
        if self.decoder.masked_ids:
            logits[:, list(self.decoder.masked_ids)] = -torch.inf
        logq = torch.log_softmax(logits, dim=-1).double()
        logp = self.logp[rows].double()
        p = logp.exp()
        return float(torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1).mean())

    def _p(self, rows, start: int, count: int) -> torch.Tensor:
        return self.logp[rows, start : start + count].double().exp()

    def _blocks(self):
        for start in range(0, self.vocab, HEAD_ROWS):
            yield start, self.ckpt.rows(self.head.weight, start, min(self.vocab, start + HEAD_ROWS))

    def _logits(self, block: torch.Tensor, start: int) -> torch.Tensor:
        z = self.h @ block.T
        if self.bias is not None:
            z = z + self.bias[start : start + block.shape[0]]
        return z * self.decoder.logits_scale

    def kl(self, candidates: tuple[Storage, ...], rows: torch.Tensor) -> dict[str, float]:
        """Mean second-order KL a head quantized at each candidate adds at the scored tokens ``rows``:
        1/2 (E_p[dz^2] - E_p[dz]^2)."""
        quantized = [s for s in candidates if s.quantized]
        h = self.h[rows]
        second = {s.label: torch.zeros(h.shape[0], dtype=torch.float64) for s in quantized}
        first = {s.label: torch.zeros(h.shape[0], dtype=torch.float64) for s in quantized}
        with torch.no_grad():
            for start, block in self._blocks():
                p = self._p(rows, start, block.shape[0])
                for s in quantized:
                    dz = (h @ (dequantized(block, s) - block).T).double() * self.decoder.logits_scale
                    second[s.label] += (p * dz.pow(2)).sum(-1)
                    first[s.label] += (p * dz).sum(-1)
        return {s.label: float((0.5 * (second[s.label] - first[s.label].pow(2))).mean()) if s.quantized else 0.0
                for s in candidates}


def _rows(ckpt, plan: ModelPlan, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the table's distinct rows ``ids`` use, the index of each id's row): rows are quantized
    independently, so only those are read."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return torch.stack([ckpt.rows(plan.decoder.embedding, int(t), int(t) + 1)[0] for t in unique]), inverse


def _table_rows(ckpt, plan: ModelPlan, ids: torch.Tensor, storage: Storage) -> torch.Tensor:
    """``ids`` embedded from the table stored at ``storage`` (times the embedding scale), shaped as ``ids`` + hidden."""
    rows, inverse = _rows(ckpt, plan, ids)
    return dequantized(rows, storage)[inverse] * plan.decoder.embedding_scale


def embedding_perturbation(ckpt, plan: ModelPlan, ids: torch.Tensor, item: Choosable) -> Perturbation:
    """The embedded tokens' change at each candidate."""
    rows, inverse = _rows(ckpt, plan, ids)
    scale = plan.decoder.embedding_scale
    return Perturbation(torch.arange(len(ids)), {s.label: _squared((dequantized(rows, s) - rows)[inverse] * scale)
                                                 for s in item.candidates if s.quantized})


# ---- the pass -------------------------------------------------------------------------------------


def _score_sample(n: int, count: int, seed: int) -> torch.Tensor:
    if n <= count:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def _forward(module: torch.nn.Module, x: torch.Tensor, extra: dict, swapped: dict[torch.nn.Module, torch.Tensor]) -> torch.Tensor:
    """The layer on ``x`` with the given weights swapped in (restored after)."""
    originals = {m: m.weight.data for m in swapped}
    for m, w in swapped.items():
        m.weight.data = w
    try:
        with torch.no_grad():
            return module(x, **extra)
    finally:
        for m, w in originals.items():
            m.weight.data = w


def _energy(delta: torch.Tensor) -> torch.Tensor:
    """Per token |delta_t|^2 of a [1, seq, hidden] perturbation."""
    return delta[0].double().pow(2).sum(-1)


def measure_errors(ckpt, arch, plan: ModelPlan, text: str, calibration, items: list[Choosable],
                   options: SensitivityOptions | None = None, task=None, report: dict | None = None) -> dict[str, dict[str, float]]:
    """{tensor name: {storage label: estimated mean KL per token}} for every choosable tensor,
    streaming one layer at a time.

    ``calibration``: the run's calibration options (samples, seqlen, seed): ``min(samples,
    options.windows)`` windows are drawn. ``task.advance`` is called per layer and for the head.

    With ``options.propagate`` (the default) the first window also runs as a *perturbed stream*
    with every choosable tensor at ``PROBE`` (int4-g128), which measures what the module
    docstring's first-order model leaves out: per layer ``k``, the gain ``g_k`` by which the
    layer (float weights) grows a perturbation already in the residual stream (from running it
    on the perturbed and the float input, both weighted per token by ``kappa``, so a token costs
    what it costs at the head); a perturbation injected at layer ``j`` is then worth
    ``prod_{k>j} g_k`` times its first-order cost. At the end, ``c``: the perturbed stream's
    actual KL over its ``kappa``-predicted KL, the factor by which quantization noise is more
    (or less) harmful than a random direction; every residual-stream cost is multiplied by it
    (the head's own KL is exact and is not). ``report`` (a dict) receives the gains and ``c``.
    """
    options = options or SensitivityOptions(seed=calibration.seed)
    decoder = plan.decoder
    draw = replace(calibration, samples=min(calibration.samples, options.windows))
    tokens = calibration_tokens(ckpt, text, draw)
    extra = arch.calibration_inputs(ckpt.config, draw.seqlen)
    seqlen = draw.seqlen
    sample = _score_sample(tokens.numel(), options.score_tokens, options.seed)
    scored = torch.unique(torch.cat([torch.arange(seqlen), sample]))  # where kappa is needed
    where = {int(t): i for i, t in enumerate(scored)}
    perturbations: dict[str, list[tuple[int, Perturbation]]] = {}  # name -> (layer it enters after, perturbation)
    by_layer: dict[int, list[Choosable]] = {}
    x = embedded(ckpt, decoder, tokens)
    perturbed = x[:1].clone() if options.propagate else None
    for item in items:
        if item.kind == "linear":
            by_layer.setdefault(item.layer, []).append(item)
        elif item.kind in ("embedding", "table"):
            found = embedding_perturbation(ckpt, plan, tokens.reshape(-1)[sample], item)
            perturbations[item.name] = [(-1, found)]
            if perturbed is not None:  # the first window's tokens, embedded from the probe-quantized table
                probe = next(s for s in item.candidates if s.label == PROBE)
                perturbed = _table_rows(ckpt, plan, tokens[:1], probe)
    energies: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: perturbation per token before it, and grown by it
    for layer in stream_layers(ckpt, decoder.layers, task):
        module = arch.loaded_layer(ckpt.config, layer, load_tensors(ckpt, layer.tensors()))  # one copy of the layer
        probes: dict[str, torch.Tensor] = {}
        x_in = x[:1]
        found, x = layer_perturbations(module, layer, x, extra, by_layer.get(layer.index, []), sample,
                                       probes if perturbed is not None else None)
        for name, perturbation in found.items():
            perturbations.setdefault(name, []).append((layer.index, perturbation))
        if perturbed is not None:
            energies.append((_energy(perturbed - x_in), _energy(_forward(module, perturbed, extra, {}) - x[:1])))
            swapped = {module.get_submodule(layer.module_path(name)): w for name, w in probes.items()}
            perturbed = _forward(module, perturbed, extra, swapped)
        del module, probes
    head = Head(ckpt, plan, x.reshape(-1, x.shape[-1])[scored])
    direction, gains = 1.0, []
    if perturbed is not None:
        window = torch.tensor([where[t] for t in range(seqlen)])
        kappa = head.kappa[window]
        # in KL units per token (kappa): a few huge-norm tokens (massive activations) weigh what they cost
        gains = [float((kappa * grown).sum() / (kappa * before).sum()) if float((kappa * before).sum()) > 0 else 1.0
                 for before, grown in energies]
        actual = head.kl_of(perturbed[0], window)
        predicted = float((kappa * _energy(perturbed - x[:1])).mean())
        direction = actual / predicted if predicted > 0 else 1.0
    # gain from after layer j to the end: prod of g_k for k > j (the embedding enters before layer 0: j = -1)
    after = [1.0] * (len(gains) + 1)
    for k in range(len(gains) - 1, -1, -1):
        after[k] = after[k + 1] * gains[k]
    carried = (lambda j: direction * after[j + 1]) if perturbed is not None else (lambda j: 1.0)
    errors: dict[str, dict[str, float]] = {}
    for item in items:
        total = dict.fromkeys((s.label for s in item.candidates), 0.0)
        for j, perturbation in perturbations.get(item.name, []):
            kappa = head.kappa[[where[int(t)] for t in perturbation.tokens]]
            for label, squared in perturbation.squared.items():
                total[label] += carried(j) * float((kappa * squared).mean())
        if item.kind in ("lm_head", "table"):
            for label, value in head.kl(item.candidates, torch.tensor([where[int(t)] for t in sample])).items():
                total[label] += value
        errors[item.name] = total
    if report is not None:
        report.update({"gains": gains, "direction": direction})
    if task is not None:
        task.advance("LM head")
    return errors
