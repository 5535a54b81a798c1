"""Validate result files in, one row per (artifact, provider) out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json

SUPPORTED_SCHEMA = 1


@dataclass(frozen=True)
class Row:
    """The figures a report shows and gates on, from one validate record."""

    artifact: str
    provider: str | None
    status: str
    reason: str | None
    target: str | None
    size_bytes: int | None
    bits_per_weight: float | None
    perplexity_reference: float | None
    perplexity: float | None
    perplexity_change_pct: float | None
    kld_mean: float | None
    kld_p99: float | None
    top1_agreement: float | None
    prefill_tps: float | None
    decode_tps: float | None
    ttft_s: float | None
    peak_rss_anon_mb: float | None
    machine: dict
    source: str
    # added after schema 1's first fields (report.json rows only grow): what the table and plot also show
    format: str | None = None
    recipe: str | None = None
    settings: dict | None = None
    linear_bits_per_weight: float | None = None  # linear weights only: bits + scale/zero-point bits per block

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.artifact, self.provider)


def linear_bits(settings: dict | None, fmt: str | None, target: str | None, mix_weights: dict | None = None) -> float | None:
    """Bits per weight of the quantized linears alone, from the settings: codes + scale and zero point per block.

    ONNX MatMulNBits stores one scale per block in the target's float type (fp32 on cpu and
    mobile, fp16 on dml) and a packed zero point only when asymmetric; Core ML's
    constexpr_blockwise_shift_scale stores an fp16 scale and an offset for every block.
    Precision overrides (an int8 lm_head, say) are not counted. Unquantized: the float bits.
    A size budget's mix (``settings.mix``): the weighted mean over its layer linears' choices
    (``mix_weights``: label -> weights, the manifest's ``mix_linear_weights``); None without them.
    """
    if not isinstance(settings, dict) or not isinstance(settings.get("bits"), int):
        return None
    if settings.get("mix"):
        return _mix_bits(settings, fmt, target, mix_weights)
    return _storage_bits(settings["bits"], settings.get("block_size"), settings.get("symmetric"), fmt, target)


def _mix_bits(settings: dict, fmt: str | None, target: str | None, mix_weights: dict | None) -> float | None:
    if not isinstance(mix_weights, dict) or not mix_weights:
        return None
    from phi3_export.quant.settings import parse_storage

    total = weighted = 0.0
    for label, weights in mix_weights.items():
        try:
            storage = parse_storage(str(label), bool(settings.get("symmetric")))
            storage_bits = storage.bits
        except ValueError:  # not a label quantize writes
            return None
        if not isinstance(weights, int):
            return None
        bits = _storage_bits(storage_bits, storage.block_size or None, storage.symmetric, fmt, target)
        if bits is None:
            return None
        total, weighted = total + weights, weighted + bits * weights
    return weighted / total if total else None


def _storage_bits(bits: int, block: object, symmetric: object, fmt: str | None, target: str | None) -> float | None:
    if bits in (16, 32):
        return float(bits)
    if not isinstance(block, int) or block <= 0:
        return None
    if fmt == "coreml":
        scale, zero = 16, bits
    elif fmt == "onnx":
        scale, zero = _scale_bits(target), 0 if symmetric else bits
    else:
        return None
    return bits + (scale + zero) / block


def _scale_bits(target: str | None) -> int:
    try:
        import numpy as np

        from phi3_export.export.onnx.targets import TARGETS

        return 8 * np.dtype(TARGETS[target].io_dtype).itemsize
    except (ImportError, KeyError):
        return 32


def _first_speed(speed: dict | None) -> dict:
    """The shortest measured prompt length's figures (records list them by length)."""
    measured = [(int(k), v) for k, v in (speed or {}).items() if isinstance(v, dict) and "prefill_tokens_per_s" in v]
    return min(measured)[1] if measured else {}


def _median(stat: dict | None) -> float | None:
    return stat.get("median") if isinstance(stat, dict) else None


def row_from_record(record: dict, source: str) -> Row:
    accuracy = record.get("accuracy") or {}
    speed = _first_speed(record.get("speed"))
    size, weights = record.get("size_bytes"), record.get("weights")
    return Row(
        artifact=record["artifact"], provider=record.get("provider"), status=record["status"], reason=record.get("reason"),
        target=record.get("target"), size_bytes=size,
        bits_per_weight=8 * size / weights if size and weights else None,
        perplexity_reference=accuracy.get("perplexity_reference"), perplexity=accuracy.get("perplexity_artifact"),
        perplexity_change_pct=accuracy.get("perplexity_change_pct"), kld_mean=accuracy.get("kld_mean"),
        kld_p99=accuracy.get("kld_p99"), top1_agreement=accuracy.get("top1_agreement"),
        prefill_tps=_median(speed.get("prefill_tokens_per_s")), decode_tps=_median(speed.get("decode_tokens_per_s")),
        ttft_s=_median(speed.get("time_to_first_token_s")),
        peak_rss_anon_mb=(record.get("memory") or {}).get("peak_rss_anon_mb"),
        machine=record.get("machine") or {}, source=source,
        format=record.get("format"), recipe=record.get("recipe"), settings=record.get("settings"),
        linear_bits_per_weight=linear_bits(record.get("settings"), record.get("format"), record.get("target"),
                                           record.get("mix_linear_weights")),
    )


def read_records(path: Path) -> list[dict]:
    """Records of a validate result file, or of a report.json (used as a baseline)."""
    path = Path(path)
    if not path.is_file():
        raise Phi3ExportError(f"{path}: no such file")
    doc = read_json(path, "a validate result or report.json")
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise Phi3ExportError(f"{path}: not a validate result (expected an object with a 'records' list)")
    if doc.get("schema_version") != SUPPORTED_SCHEMA:
        raise Phi3ExportError(f"{path}: schema_version {doc.get('schema_version')!r}, this tool reads {SUPPORTED_SCHEMA}")
    for i, record in enumerate(doc["records"]):
        if not isinstance(record, dict) or "artifact" not in record or "status" not in record:
            raise Phi3ExportError(f"{path}: record {i} has no 'artifact'/'status' (not a validate record)")
        _check_record(path, i, record)
    return doc["records"]


# The fields a report reads, with the JSON types validate writes (None where a figure is "not run").
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "artifact": (str,), "status": (str,), "provider": (str, type(None)), "format": (str, type(None)),
    "target": (str, type(None)), "recipe": (str, type(None)), "size_bytes": (int, type(None)), "weights": (int, type(None)),
    "settings": (dict, type(None)), "accuracy": (dict, type(None)), "speed": (dict, type(None)), "memory": (dict, type(None)),
    "checks": (list, type(None)), "reference": (dict, type(None)), "machine": (dict, type(None)),
    "versions": (dict, type(None)), "generation": (list, dict, type(None)), "long_context": (list, dict, type(None)),
    "kv_cache_bytes": (dict, int, type(None)), "tokenizer": (dict, type(None)),
}


def _check_record(path: Path, i: int, record: dict) -> None:
    """A record from disk has the types the report reads, else one line naming the record and field."""
    for key, types in _RECORD_TYPES.items():
        if key in record and not isinstance(record[key], types) or isinstance(record.get(key), bool):
            raise Phi3ExportError(f"{path}: record {i} ({str(record.get('artifact'))[:60]}): field {key!r} is a "
                                  f"{type(record[key]).__name__}, not what validate writes")
    for length, figures in (record.get("speed") or {}).items():
        if length in ("status", "reason", "note"):  # a speed section that is itself "not run"
            continue
        if figures is not None and not isinstance(figures, dict):
            raise Phi3ExportError(f"{path}: record {i}: speed[{length!r}] is not an object")
        if isinstance(figures, dict) and "status" not in figures and not length.isdigit():
            raise Phi3ExportError(f"{path}: record {i}: speed key {length!r} is not a prompt length")
    for name in ("accuracy", "memory"):
        for key, value in (record.get(name) or {}).items():
            if isinstance(value, str) and key not in ("eval_text", "eval_sha256", "note", "status", "reason", "how"):
                raise Phi3ExportError(f"{path}: record {i}: {name}.{key} is a string, not a number")


def latest_records(record_files: dict[Path, list[dict]]) -> list[tuple[Path, dict]]:
    """(file, record) per (artifact, provider): a later file's record of the same pair wins, first-seen order kept."""
    if not record_files:
        raise Phi3ExportError("report: give at least one validate result file")
    out: dict[tuple, tuple[Path, dict]] = {}
    for path, records in record_files.items():
        for record in records:
            out[(record["artifact"], record.get("provider"))] = (path, record)
    return list(out.values())


def load_rows(record_files: dict[Path, list[dict]]) -> list[Row]:
    """Rows of already-read record files (``read_records``), in file order."""
    return [row_from_record(record, str(path)) for path, record in latest_records(record_files)]
