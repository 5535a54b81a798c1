"""The model plan: a typed, format-neutral description of a model that every stage walks.

An architecture module turns a checkpoint's config.json into a ``ModelPlan``; quantizers
(RTN, AWQ), exporters (ONNX, Core ML) and validate's streamed reference read the plan and
never a model name. A decoder layer is four blocks, each with a ``kind`` that stages look
up in their own tables (``BLOCK_EMITTERS`` in the ONNX exporter, ``BLOCKS`` in the Core ML
program, ``TORCH_BLOCKS`` here for the reference):

    attn_norm: Norm (rms | layer)  ->  attention: Attention (dense | blocksparse)
    mlp_norm:  Norm (rms | layer)  ->  mlp: Mlp (swiglu | geglu) | Moe (sparsemixer | softmax routing)

Tensors are named by their checkpoint name. A ``Linear`` may be fused (``parts``: named row
selectors, contiguous or strided, e.g. q|k|v of Phi-3's qkv_proj); its ``role`` is the key a
recipe's precision ``overrides`` use. Adding a family member means a registry module that
returns a plan, plus an emitter per stage for any block kind that is new.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from phi3_export.arch.blocksparse import BlockSparse

if TYPE_CHECKING:
    from phi3_export.arch.vision import ImageEmbedding


@dataclass(frozen=True)
class Rows:
    """Rows of a weight: ``start:stop:step``, or with ``width`` > 1 runs of ``width`` rows
    every ``step`` rows (Phi-3-small's head-group-major qkv: each KV group's q heads, k, v).

    ``step`` 2 selects interleaved rows (GEGLU's gate and linear halves).
    """

    start: int
    stop: int
    step: int = 1
    width: int = 1

    def slice(self) -> slice:
        if self.width != 1:
            raise ValueError("rows in runs have no single slice; use index()")
        return slice(self.start, self.stop, self.step)

    def indices(self) -> list[int]:
        return [r for s in range(self.start, self.stop, self.step) for r in range(s, min(s + self.width, self.stop))]

    def index(self) -> slice | list[int]:
        """What selects these rows of a tensor: a slice, or a row list (assign through it, not in place)."""
        return self.slice() if self.width == 1 else self.indices()

    @property
    def count(self) -> int:
        if self.width == 1:
            return len(range(self.start, self.stop, self.step))
        return len(self.indices())


@dataclass(frozen=True)
class Linear:
    """y = x W^T (+ b). ``quantize`` False keeps the weight float (a MoE router)."""

    weight: str
    role: str
    shape: tuple[int, int]  # [out, in]
    bias: str | None = None
    parts: tuple[tuple[str, Rows], ...] = ()
    quantize: bool = True
    # Parts whose rows AWQ's clip search leaves alone (``("*",)``: the whole weight), each
    # declared with its reason where the plan is built.
    unclipped: tuple[str, ...] = ()

    def rows(self, part: str) -> Rows:
        for name, rows in self.parts:
            if name == part:
                return rows
        raise KeyError(f"{self.weight} has no part {part!r}")

    def part_sizes(self) -> list[int]:
        return [rows.count for _, rows in self.parts]

    def row_order(self) -> list[int] | None:
        """Rows in parts order (q|k|v, gate|linear) when that is not the stored order, else None.

        Exporters emit a fused linear with its rows in this order, so its output splits into
        parts by size; a row permutation of block-wise codes keeps every code and scale.
        """
        if not self.parts:
            return None
        order = [r for _, rows in self.parts for r in rows.indices()]
        return None if order == list(range(len(order))) else order

    def clipped_rows(self) -> list[slice | list[int]]:
        """Row ranges the clip search may shrink."""
        if "*" in self.unclipped:
            return []
        if not self.unclipped:
            return [slice(None)]
        return [rows.index() for name, rows in self.parts if name not in self.unclipped]

    def tensors(self) -> tuple[str, ...]:
        return (self.weight,) + ((self.bias,) if self.bias else ())


@dataclass(frozen=True)
class Norm:
    kind: Literal["rms", "layer"]
    weight: str
    eps: float
    bias: str | None = None
    module: str = ""  # path in the torch layer module (AWQ folds into it, scores by it)

    def tensors(self) -> tuple[str, ...]:
        return (self.weight,) + ((self.bias,) if self.bias else ())


@dataclass(frozen=True)
class Rotary:
    """RoPE on the first ``dim`` dims of each head (halves, not interleaved).

    LongRoPE: ``short``/``long`` per-frequency divisors; every position uses the long ones
    once the sequence outgrows ``original_context``. ``short_scale``/``long_scale`` multiply
    cos and sin (LongRoPE's attention factor, or PhiMoE's published mscales).
    """

    dim: int
    theta: float
    original_context: int
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    short_scale: float = 1.0
    long_scale: float = 1.0

    @property
    def longrope(self) -> bool:
        return self.short_factor is not None


@dataclass(frozen=True)
class KvLayout:
    """GQA: ``kv_heads`` KV heads of ``head_dim``, each read by ``n_rep`` query heads."""

    kv_heads: int
    n_rep: int
    head_dim: int


@dataclass(frozen=True)
class Attention:
    """Self-attention with RoPE and a KV cache. q/k/v are one fused ``qkv`` or three linears.

    ``kind`` "dense": causal (optionally sliding-window); "blocksparse": causal within the
    ``blocksparse`` pattern (arch/blocksparse.py, Phi-3-small). ``scale`` multiplies q.k.
    """

    kind: Literal["dense", "blocksparse"]
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    o: Linear
    qkv: Linear | None = None  # parts q, k, v
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    sliding_window: int | None = None
    blocksparse: BlockSparse | None = None
    module: str = "self_attn"

    @property
    def projections(self) -> tuple[Linear, ...]:
        return (self.qkv,) if self.qkv is not None else (self.q, self.k, self.v)

    @property
    def kv_layout(self) -> KvLayout:
        return KvLayout(self.kv_heads, self.heads // self.kv_heads, self.head_dim)

    def linears(self) -> tuple[Linear, ...]:
        return (*self.projections, self.o)


@dataclass(frozen=True)
class Mlp:
    """A gated MLP with gate and up fused in one linear ``gate_up``:

    - "swiglu" (parts gate, up): down(silu(gate) * up);
    - "geglu" (parts gate, linear; Phi-3-small): down(quick_gelu(g) * (l + 1)) with
      g = min(gate, limit), l = clamp(linear, -limit, limit), quick_gelu(x) = x * sigmoid(1.702 x).
    """

    kind: Literal["swiglu", "geglu"]
    intermediate: int
    gate_up: Linear
    down: Linear
    module: str = "mlp"
    limit: float | None = None

    def linears(self) -> tuple[Linear, ...]:
        return (self.gate_up, self.down)


@dataclass(frozen=True)
class Expert:
    """One SwiGLU expert with separate gate (w1), up (w3) and down (w2) linears."""

    gate: Linear
    up: Linear
    down: Linear

    def linears(self) -> tuple[Linear, ...]:
        return (self.gate, self.up, self.down)


@dataclass(frozen=True)
class Moe:
    """Mixture of experts: a float router picks ``top_k`` experts per token.

    ``routing`` "sparsemixer" (Phi-3.5-MoE): at inference the top-2 by router logit, each
    weighted by a softmax over the experts whose logit lies within ``2 * jitter_eps`` of the
    chosen one (relative to max(|logit|, chosen)), the second computed with the first masked out.
    """

    kind: Literal["moe"]
    intermediate: int
    router: Linear
    experts: tuple[Expert, ...]
    top_k: int
    routing: Literal["sparsemixer", "softmax"]
    jitter_eps: float = 0.0
    module: str = "block_sparse_moe"

    def linears(self) -> tuple[Linear, ...]:
        return (self.router, *(lin for expert in self.experts for lin in expert.linears()))


@dataclass(frozen=True)
class ScalingGroup:
    """An AWQ scaling group: linears that share an input, and where 1/s is folded.

    ``prev`` is the norm or linear whose output feeds ``linears``; with ``prev_part`` only
    that part's rows of a fused ``prev`` do (the V rows of qkv, the up rows of gate_up).
    ``also_scaled`` are float linears reading the same input (a MoE router): their columns
    take ``s`` too, so the fold stays exact. ``kv_shared``: the scale is one value per
    KV-head channel, repeated to the query heads that read it (GQA). ``inspect`` is the
    layer submodule whose output scores a candidate (attention, MLP); without it, the
    linears' own outputs do. ``min_tokens``: below this many calibration tokens (an expert
    the router rarely picks) the group is left to plain RTN.
    """

    prev: Norm | Linear
    linears: tuple[Linear, ...]
    prev_part: str | None = None
    also_scaled: tuple[Linear, ...] = ()
    kv_shared: KvLayout | None = None
    inspect: str | None = None
    min_tokens: int = 0

    @property
    def label(self) -> str:
        prev = self.prev.weight.removesuffix(".weight") + (f"[{self.prev_part}]" if self.prev_part else "")
        return f"{prev}->{'+'.join(lin.weight.removesuffix('.weight').rsplit('.', 1)[-1] for lin in self.linears)}"


@dataclass(frozen=True)
class DecoderLayer:
    index: int
    prefix: str  # tensor-name prefix of this layer; the rest is the path in the torch layer module
    attn_norm: Norm
    attention: Attention
    mlp_norm: Norm
    mlp: Mlp | Moe
    scaling_groups: tuple[ScalingGroup, ...] = ()

    def linears(self) -> tuple[Linear, ...]:
        return (*self.attention.linears(), *self.mlp.linears())

    def norms(self) -> tuple[Norm, ...]:
        return (self.attn_norm, self.mlp_norm)

    def tensor_groups(self) -> Iterator[tuple[str, tuple[Linear | Norm, ...]]]:
        """The layer's tensors in storage groups: attention part, then one group per expert.

        Quantizers flush (and exporters read) a group at a time, so one expert's weights
        are the most a stage holds of a MoE layer.
        """
        yield "", (self.attn_norm, *self.attention.linears(), self.mlp_norm)
        if isinstance(self.mlp, Moe):
            yield "router", (self.mlp.router,)
            for e, expert in enumerate(self.mlp.experts):
                yield f"expert-{e:03d}", expert.linears()
        else:
            yield "mlp", self.mlp.linears()

    def tensors(self) -> tuple[str, ...]:
        names: list[str] = []
        for _, blocks in self.tensor_groups():
            for block in blocks:
                names.extend(block.tensors())
        return tuple(names)

    def module_path(self, tensor: str) -> str:
        """'model.layers.3.self_attn.o_proj.weight' -> 'self_attn.o_proj' (the torch layer's submodule)."""
        return tensor.removeprefix(self.prefix).rsplit(".", 1)[0]


@dataclass(frozen=True)
class Decoder:
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    embedding: str  # [vocab, hidden] table
    layers: tuple[DecoderLayer, ...]
    final_norm: Norm
    lm_head: Linear  # tied: its weight is the embedding table itself
    tied: bool
    rotary: Rotary
    # muP (Phi-3-small): the embedding output is multiplied by embedding_scale, the logits by
    # logits_scale; masked_ids (vocabulary ids no token uses) get float32's lowest logit.
    embedding_scale: float = 1.0
    logits_scale: float = 1.0
    masked_ids: tuple[int, ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        """Every linear role of a layer, in order (what precision overrides can name)."""
        return tuple(dict.fromkeys(lin.role for layer in self.layers[:1] for lin in layer.linears()))


@dataclass(frozen=True)
class ModelPlan:
    architecture: str
    decoder: Decoder
    genai_type: str  # onnxruntime-genai's model type for this decoder
    # Formats this model cannot be exported to, each with its reason (the exporter says it).
    refused_formats: dict[str, str] = field(default_factory=dict)
    # Checkpoint tensors the plan does not read and that are no error (each declared with its reason).
    ignorable: tuple[str, ...] = ()
    # Image + text models (arch/vision.py): the image embedding; the decoder then takes inputs_embeds.
    image: ImageEmbedding | None = None
