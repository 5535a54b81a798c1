"""Resolved quantization settings: the recipe's, with command-line flags on top."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pydantic import ValidationError

from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.loader import clean_message
from phi3_export.recipes.schema import Quantization

FLOAT_BITS = {16: "fp16", 32: "fp32"}


@dataclass(frozen=True)
class Storage:
    """How one tensor is stored: ``precision`` int4 / int8 / fp16 / fp32, and for an integer
    precision its block size (columns per scale) and symmetry."""

    precision: str
    block_size: int = 0
    symmetric: bool = True

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    @property
    def bits(self) -> int:
        return int(self.precision[3:]) if self.quantized else int(self.precision[2:])

    @property
    def label(self) -> str:
        """``int4-g128``, ``int8-g32``, ``fp16``: how a size-budget mix names a choice."""
        return f"{self.precision}-g{self.block_size}" if self.quantized else self.precision


def parse_storage(label: str, symmetric: bool) -> Storage:
    """The inverse of ``Storage.label`` (the symmetry is the run's)."""
    precision, _, block = label.partition("-g")
    return Storage(precision, int(block), symmetric) if block else Storage(precision)


@dataclass(frozen=True)
class QuantSettings:
    bits: int
    method: str
    block_size: int
    symmetric: bool
    accuracy_level: int
    overrides: dict[str, str] = field(default_factory=dict)
    # Per-tensor choices of a size budget (quant/budget.py): tensor name -> Storage.label.
    # Wins over ``overrides`` and the defaults for the tensors it names.
    mix: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_recipe(cls, q: Quantization, **flags) -> QuantSettings:
        """The recipe's settings with every given flag on top, validated by the same schema."""
        given = {k: v for k, v in flags.items() if v is not None}
        try:
            merged = Quantization.model_validate({**q.model_dump(), **given})
        except ValidationError as exc:
            err = exc.errors()[0]
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
            raise Phi3ExportError(f"{flag}: {clean_message(err['msg'])}") from None
        values = {k: getattr(merged, k) for k in ("bits", "method", "block_size", "symmetric", "accuracy_level")}
        if merged.bits not in (4, 8):
            # Unquantized exports keep every tensor float: precision overrides do not apply.
            return cls(overrides={}, **values)
        return cls(overrides=dict(merged.overrides), **values)

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    def precision(self, role: str) -> str:
        """int4 / int8 / fp16 / fp32 for a tensor role (linear roles, lm_head, embed_tokens)."""
        if role in self.overrides:
            return self.overrides[role]
        default = f"int{self.bits}" if self.quantized else FLOAT_BITS[self.bits]
        if role == "embed_tokens":
            # A lookup table gains nothing from MatMulNBits; it stays float unless tied.
            return "fp32" if self.quantized else default
        return default

    def storage(self, name: str, role: str) -> Storage:
        """How the tensor ``name`` (of registry role ``role``) is stored: the size budget's choice
        if it made one, else the role's precision at the run's block size and symmetry."""
        if name in self.mix:
            return parse_storage(self.mix[name], self.symmetric)
        precision = self.precision(role)
        if precision in ("int4", "int8"):
            return Storage(precision, self.block_size, self.symmetric)
        return Storage(precision)

    @property
    def tag(self) -> str:
        """Short form used in artifact names: w4g32s, w4g128a, w32."""
        if not self.quantized:
            return f"w{self.bits}"
        return f"w{self.bits}g{self.block_size}{'s' if self.symmetric else 'a'}"

    def as_dict(self) -> dict:
        values = asdict(self)
        if not self.mix:
            del values["mix"]  # a run without a size budget records what it always did
        return values
