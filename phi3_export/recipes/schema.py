"""The recipe: one YAML per model and context variant, typed and validated.

A recipe states the architecture facts of its model (checked against a checkpoint's
config.json) and the export settings. A fact the published config does not give is left
as ``from-checkpoint`` rather than guessed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FROM_CHECKPOINT = "from-checkpoint"
FromCheckpoint = Literal["from-checkpoint"]

Target = Literal["cpu", "dml", "mobile"]
Precision = Literal["int4", "int8", "fp16", "fp32"]
TokenizerKind = Literal["llama-sentencepiece", "byte-bpe"]
RopeKind = Literal["default", "longrope"]
# Quantization methods (quant/stage.py's QUANTIZERS runs each).
Method = Literal["rtn", "awq", "gptq", "awq-gptq"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rope(Strict):
    kind: RopeKind
    theta: float = Field(gt=0)
    partial_rotary_factor: float = Field(default=1.0, gt=0, le=1)

    @field_validator("kind", mode="before")
    @classmethod
    def _su_is_longrope(cls, value: object) -> object:
        # Older Phi-3 128k config files call LongRoPE "su"; it is the same scheme.
        return "longrope" if value == "su" else value


class BlocksparseFacts(Strict):
    """Phi-3-small's attention pattern (config.json ``blocksparse_*`` keys, arch/blocksparse.py)."""

    block_size: int | FromCheckpoint = Field(gt=0)
    num_local_blocks: int | FromCheckpoint = Field(gt=0)
    vert_stride: int | FromCheckpoint = Field(gt=0)
    homo_head_pattern: bool | FromCheckpoint = False
    # Layers i with (i + 1) % dense_attention_every_n_layers == 0 attend densely (0: none does).
    dense_attention_every_n_layers: int | FromCheckpoint = Field(ge=0)


class ModelFacts(Strict):
    """Architecture facts; the same shape is built from a checkpoint's config.json."""

    architecture: str
    model_type: str
    num_layers: int | FromCheckpoint = Field(gt=0)
    hidden_size: int | FromCheckpoint = Field(gt=0)
    num_heads: int | FromCheckpoint = Field(gt=0)
    num_kv_heads: int | FromCheckpoint = Field(gt=0)
    head_dim: int | FromCheckpoint = Field(gt=0)
    intermediate_size: int | FromCheckpoint = Field(gt=0)
    vocab_size: int | FromCheckpoint = Field(gt=0)
    context_length: int | FromCheckpoint = Field(gt=0)
    original_context_length: int | FromCheckpoint = Field(gt=0)
    rope: Rope
    sliding_window: int | Literal["none"] | FromCheckpoint
    tie_word_embeddings: bool | FromCheckpoint
    tokenizer: TokenizerKind
    # Mixture of experts (Phi-3.5-MoE): experts per layer (intermediate_size is per expert) and
    # experts each token is routed to. Absent for dense models.
    num_experts: int | FromCheckpoint | None = Field(default=None, gt=0)
    experts_per_token: int | FromCheckpoint | None = Field(default=None, gt=0)
    # Blocksparse attention (Phi-3-small); absent for models that attend densely everywhere.
    blocksparse: BlocksparseFacts | None = None

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelFacts:
        h, kv = self.num_heads, self.num_kv_heads
        if isinstance(h, int) and isinstance(kv, int) and h % kv:
            raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kv}")
        return self


class AwqSettings(Strict):
    """Calibration and search settings of --method awq."""

    # Windows of calibration text, and tokens per window (at least one block of 16; at most the
    # longest context config.json may declare; api also caps it at the model's own context).
    samples: int = Field(default=32, gt=0, le=1 << 16)
    seqlen: int = Field(default=256, ge=16, le=1 << 22)
    seed: int = Field(default=0, ge=-(1 << 62), le=1 << 62)  # torch generators take 64-bit seeds (plus per-layer offsets)
    alpha_grid: int = Field(default=20, ge=1)
    clip: bool = True


class GptqSettings(Strict):
    """Settings of --method gptq and awq-gptq (quant/gptq.py); calibration is quantization.awq's."""

    damp: float = Field(default=0.01, gt=0, le=1)  # fraction of mean(diag H) added to the Hessian's diagonal
    act_order: bool = True  # columns in descending diag(H), block parameters fixed beforehand
    mse: bool = True  # each block's range shrunk by a small search (else RTN's min/max range)


class Quantization(Strict):
    bits: Literal[4, 8, 16, 32] = 4
    method: Method = "rtn"
    block_size: int = Field(default=32, ge=16, le=256)
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    # Tensors kept at another precision than `bits`, by registry role (e.g. lm_head: int8).
    overrides: dict[str, Precision] = Field(default_factory=dict)
    awq: AwqSettings = AwqSettings()
    gptq: GptqSettings = GptqSettings()

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two between 16 and 256, got {value}")
        return value


class TargetOptions(Strict):
    max_length: int | None = Field(default=None, gt=0)
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    # Execution providers and their options for genai_config.json, in priority order
    # (e.g. {dml: {}} or {qnn: {backend_path: libQnnHtp.so}}); CPU is always the fallback.
    provider_options: dict[str, dict[str, str]] | None = None


class CoreMLOptions(Strict):
    # Tokens the KV-cache state holds (and the longest inputIds). The state is allocated in
    # full on the device: 2048 tokens of Phi-3-mini is 768 MB of fp16 cache, 131072 would be 48 GB.
    context_length: int = Field(default=2048, gt=0)
    # "prefill-decode": two functions sharing weights and state, the decode one with a fixed
    # one-token input (Core ML specialises fixed shapes better); "single": one flexible function.
    functions: Literal["single", "prefill-decode"] = "single"


class CoreAIOptions(Strict):
    # Tokens the KV-cache state holds, allocated in full on the device (as for Core ML).
    context_length: int = Field(default=2048, gt=0)
    # Tokens the prefill function takes at once (a shorter prompt is padded at the end).
    prefill_chunk: int = Field(default=64, gt=0)
    # Compute dtype of the program and of its KV cache: float16 on devices; float32 is a
    # parity check (twice the cache, no faster).
    precision: Literal["float16", "float32"] = "float16"


class VisionOptions(Strict):
    """Image models (Phi-3-vision): the image encoder's export settings."""

    # HD sub-crops per image (the published preprocessor_config.json: 16 for Phi-3-vision, 4 for
    # Phi-3.5-vision); written to the artifact's processor_config.json.
    num_crops: int = Field(default=16, gt=0, le=64)
    # Weights of vision.onnx: float (fp32 / fp16) by default, or block-wise int8 / int4 MatMulNBits.
    precision: Precision = "fp32"


class Export(Strict):
    targets: list[Target] = Field(default_factory=lambda: ["cpu"], min_length=1)
    # Generation max_length written to genai_config: the KV cache is sized from it.
    max_length: int = Field(default=4096, gt=0)
    target_options: dict[Target, TargetOptions] = Field(default_factory=dict)
    coreml: CoreMLOptions = CoreMLOptions()
    coreai: CoreAIOptions = CoreAIOptions()
    vision: VisionOptions = VisionOptions()


class ReportThresholds(Strict):
    max_kld_increase: float = Field(default=0.01, ge=0)
    max_ppl_increase_pct: float = Field(default=2.0, ge=0)
    max_size_increase_pct: float = Field(default=1.0, ge=0)
    min_decode_tps_ratio: float = Field(default=0.8, gt=0)


class Recipe(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    description: str = ""
    model: ModelFacts
    quantization: Quantization = Quantization()
    export: Export = Export()
    report: ReportThresholds = ReportThresholds()

    @model_validator(mode="after")
    def _max_length_within_context(self) -> Recipe:
        ctx = self.model.context_length
        lengths = [("export.max_length", self.export.max_length)] + [
            (f"export.target_options.{t}.max_length", o.max_length)
            for t, o in self.export.target_options.items()
        ] + [("export.coreml.context_length", self.export.coreml.context_length),
             ("export.coreai.context_length", self.export.coreai.context_length)]
        for where, length in lengths:
            if isinstance(ctx, int) and length is not None and length > ctx:
                raise ValueError(f"{where} {length} exceeds model.context_length {ctx}")
        return self
