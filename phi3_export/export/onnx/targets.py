"""ONNX targets: what differs between cpu, dml and mobile artifacts, as data."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from phi3_export.arch.plan import ModelPlan
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.schema import Recipe


@dataclass(frozen=True)
class OnnxTarget:
    name: str
    io_dtype: type  # activations, KV cache, float weights
    default_providers: dict[str, dict[str, str]]
    float_bits: tuple[int, ...]  # unquantized exports this target runs
    # DirectML graph capture cannot run control-flow nodes; none of our graphs use any, and
    # the exporter asserts it for targets that forbid them.
    control_flow_allowed: bool = True
    # Contrib ops this target's runtime is not known to run, each with the reason: a plan whose
    # blocks need one is refused before anything is quantized.
    refused_ops: dict[str, str] = field(default_factory=dict)
    notes: str = ""


TARGETS: dict[str, OnnxTarget] = {
    "cpu": OnnxTarget("cpu", np.float32, {}, float_bits=(32,)),
    "dml": OnnxTarget("dml", np.float16, {"dml": {}}, float_bits=(16, 32), control_flow_allowed=False, refused_ops={
        **{op: "not run on DirectML here (needs Windows), and the ORT-GenAI builder emits it for CUDA only"
           for op in ("QMoE", "MoE")},
        "SparseAttention": "DirectML has no kernel for it (onnxruntime's OperatorKernels.md lists it for CPU and CUDA only)",
    }),
    "mobile": OnnxTarget("mobile", np.float32, {}, float_bits=(32,)),
}


@dataclass(frozen=True)
class ResolvedTarget:
    target: OnnxTarget
    max_length: int
    accuracy_level: int
    providers: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.target.name


def check_target_ops(target: ResolvedTarget, plan: ModelPlan) -> None:
    """Refuse a target whose runtime cannot run an op the plan's blocks need, naming the op."""
    from phi3_export.export.onnx.blocks import BLOCK_CHECKS, BLOCK_OPS

    blocks = {block.kind: block for layer in plan.decoder.layers for block in (layer.attention, layer.mlp)}
    for kind in sorted(blocks):
        refused = [op for op in BLOCK_OPS.get(kind, ()) if op in target.target.refused_ops]
        if refused:
            raise Phi3ExportError(f"--target {target.name}: {plan.architecture}'s {kind} blocks need the {'/'.join(refused)} "
                                  f"op: {target.target.refused_ops[refused[0]]}")
    for layer in plan.decoder.layers:
        for block in (layer.attention, layer.mlp):
            reason = BLOCK_CHECKS[block.kind](block) if block.kind in BLOCK_CHECKS else None
            if reason:
                raise Phi3ExportError(f"--target {target.name}: layer {layer.index}: {reason}")


def resolve_target(name: str, recipe: Recipe, bits: int, accuracy_level: int, max_length: int | None) -> ResolvedTarget:
    try:
        target = TARGETS[name]
    except KeyError:
        raise Phi3ExportError(f"--target: unknown target {name!r}; choose from {', '.join(TARGETS)}") from None
    if bits in (16, 32) and bits not in target.float_bits:
        raise Phi3ExportError(
            f"--bits {bits}: target {name} runs {' or '.join(f'--bits {b}' for b in target.float_bits)} unquantized"
        )
    if max_length is not None and max_length <= 0:
        raise Phi3ExportError(f"--max-length {max_length}: must be a positive number of tokens")
    options = recipe.export.target_options.get(name)
    if max_length is not None:  # 0 is not "unset": it is refused above
        length = max_length
    else:
        length = options.max_length if options and options.max_length else recipe.export.max_length
    context = recipe.model.context_length
    if isinstance(context, int) and length > context:
        raise Phi3ExportError(f"--max-length {length} exceeds the model's context length {context}")
    level = options.accuracy_level if options and options.accuracy_level is not None else accuracy_level
    providers = options.provider_options if options and options.provider_options is not None else target.default_providers
    return ResolvedTarget(target, length, level, dict(providers))
