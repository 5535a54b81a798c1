"""A local Hugging Face checkpoint, read lazily one tensor at a time.

Only config.json, safetensors shards (with or without an index) and tokenizer files are
read (for an architecture whose tokenizer is tiktoken ranks, Phi-3-small, tokenizer.json is
built from its ranks file into a temporary folder: checkpoint/tiktoken.py). Pickle formats
(.bin/.pt/.pth/.ckpt) are refused and nothing in the folder is ever executed. Every shard's
header is checked against the file size up front, so a truncated download fails before any
output is written.

Everything read here is checked before it is used, each problem a one-line Phi3ExportError
naming the file: JSON files must be objects (typed where their fields are read), safetensors
headers are validated as safetensors will validate them, and every file opened or copied
into an artifact (index.json's shards, tokenizer files, the licence) must resolve inside the
checkpoint folder: ``../``, absolute paths and symlinks leading out are refused.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from phi3_export.checkpoint.tiktoken import TiktokenSpec
from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import json_type, read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
# The folder's files a tokenizer built from tiktoken ranks stands in for (its chat template is folded in).
BUILT_TOKENIZER_REPLACES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                            "added_tokens.json", "chat_template.jinja")
# The JSON files among TOKENIZER_FILES: each must be one JSON object (they are parsed here, by
# the exporters and by onnxruntime-genai from the artifact they are copied into).
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "generation_config.json")

# Bytes per element of every safetensors dtype with whole-byte elements (safetensors 0.8).
# Sub-byte dtypes (F4, F6_*) are not read by phi3-export and are refused as unsupported.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _read_json(path: Path, what: str = "a JSON object") -> dict[str, Any]:
    """One JSON object from ``path``; anything else is a one-line error naming the file."""
    return read_json(path, what)


_json_type = json_type


def _short(value: object) -> str:
    """A header value for an error message: never the repr of a whole (maybe huge) list."""
    if isinstance(value, list):
        items = ", ".join(_short(v) for v in value[:4])
        return f"[{items}{', ...' if len(value) > 4 else ''}]"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, str):
        return repr(value) if len(value) <= 120 else repr(value[:117]) + "..."
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _count(n: int) -> str:
    """A byte count for an error message (a crafted header's can have thousands of digits)."""
    return str(n) if n < 10**18 else "more than 10^18"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(path: Path, name: str, info: object) -> tuple[int, int]:
    """Check one tensor's header entry; its (begin, end) data offsets."""
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(info, dict):
        raise Phi3ExportError(f"{where}: header entry must be an object, got a JSON {_json_type(info)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise Phi3ExportError(f"{where}: header entry has no {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise Phi3ExportError(f"{where}: unsupported dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)})")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise Phi3ExportError(f"{where}: shape must be a list of at most 8 non-negative integers, got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise Phi3ExportError(f"{where}: data_offsets must be two non-negative integers, got {_short(offsets)}")
    begin, end = offsets
    if end < begin:
        raise Phi3ExportError(f"{where}: data_offsets {_short(offsets)} end before they begin")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != end - begin:
        raise Phi3ExportError(f"{where}: shape {_short(shape)} of {dtype} is {_count(numel * DTYPE_SIZES[dtype])} bytes, "
                              f"but its data_offsets span {_count(end - begin)}")
    return begin, end


def _tensor_index(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a safetensors header and check it as safetensors will, without reading any tensor.

    Every malformed header is a one-line Phi3ExportError naming the file (and the tensor):
    entries must be objects with a known dtype, a shape and data offsets whose byte length the
    shape implies; the tensors must tile the data region exactly, in offset order, as
    safetensors requires (so opening the file later cannot fail). Nothing larger than the
    header itself (never more than the file) is allocated.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Phi3ExportError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise Phi3ExportError(f"{path}: truncated or corrupt safetensors header")
        raw = f.read(header_len)
    if len(raw) < header_len:
        raise Phi3ExportError(f"{path}: truncated or corrupt safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Phi3ExportError(f"{path}: corrupt safetensors header (not valid UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise Phi3ExportError(f"{path}: corrupt safetensors header (a JSON {_json_type(header)}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise Phi3ExportError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    spans = sorted((_header_entry(path, name, info), name) for name, info in header.items())
    data_len = size - 8 - header_len
    position = 0
    for (begin, end), name in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap before it (at byte {position})"
            raise Phi3ExportError(f"{path}: tensor {_short(name)}: data_offsets [{_count(begin)}, {_count(end)}] {what}")
        position = end
    if position > data_len:
        raise Phi3ExportError(
            f"{path}: truncated safetensors file: header needs {_count(8 + header_len + position)} bytes, file has {size}"
        )
    if position < data_len:
        raise Phi3ExportError(f"{path}: corrupt safetensors file: {data_len - position} bytes after the last tensor's data")
    return header


def _hf_cache_blobs(folder: Path) -> Path | None:
    """A Hugging Face hub snapshot (``.../snapshots/REV``) links its files to ``../../blobs``: allowed too."""
    blobs = folder.parent.parent / "blobs"
    return blobs if folder.parent.name == "snapshots" and blobs.is_dir() else None


IDENTITY_SAMPLES, IDENTITY_SAMPLE_BYTES = 16, 65536  # Checkpoint.identity: slices hashed per shard


class Checkpoint:
    """A checkpoint folder: its config, tokenizer files and tensors (loaded on demand)."""

    def __init__(self, folder: str | Path, *, tiktoken_file: str | Path | None = None):
        """``tiktoken_file``: a tiktoken ranks file to build tokenizer.json from (``--tiktoken-file``),
        for an architecture whose checkpoints ship ranks instead (``use_tiktoken``)."""
        self.folder = Path(folder)
        self._identity: str | None = None
        if not self.folder.is_dir():
            raise Phi3ExportError(f"{self.folder}: checkpoint folder not found")
        self.tiktoken_file = Path(tiktoken_file) if tiktoken_file is not None else None
        if self.tiktoken_file is not None and not self.tiktoken_file.is_file():
            raise Phi3ExportError(f"--tiktoken-file {self.tiktoken_file}: file not found")
        self._built: tempfile.TemporaryDirectory | None = None  # tokenizer files built from ranks (never in the folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise Phi3ExportError(f"{config_path}: missing config.json (not a Hugging Face checkpoint folder)")
        # Files the reader opens, or copies into artifacts, must be inside the folder (a Hugging
        # Face hub snapshot's links into its blobs folder included): see ``_contained``.
        self._roots = [r for r in (self.folder.resolve(), _hf_cache_blobs(self.folder.resolve())) if r is not None]
        self._contained(config_path, config_path)
        # An "auto_map" (remote modelling code) is ignored, never run: the registry's
        # declarative module and the config's own fields describe the model.
        self.config = _read_json(config_path, "the model's configuration object")
        self._shards = self._find_shards()
        self._where: dict[str, Path] = {}
        self._headers: dict[str, dict[str, Any]] = {}
        for shard in self._shards:
            for name, info in _tensor_index(shard).items():
                if name in self._where:
                    raise Phi3ExportError(f"{shard}: tensor {_short(name)} is also in {self._where[name].name}")
                self._where[name] = shard
                self._headers[name] = info
        self._tokenizer_json_kind: str | None = None
        self._check_tokenizer_files()
        self._open: dict[Path, Any] = {}

    def _contained(self, path: Path, what: Path | str, entry: object = None) -> Path:
        """``path``, unless it (or a symlink on the way) resolves outside the checkpoint folder."""
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self._roots):
            named = f"entry {entry!r}" if entry is not None else "it"
            raise Phi3ExportError(f"{what}: {named} resolves to {resolved}, outside the checkpoint folder {self.folder} "
                                  "(symlinks and paths leaving the folder are refused)")
        return path

    def _find_shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self._contained(index, index)
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                got = "an empty one" if weight_map == {} else f"a JSON {_json_type(weight_map)}"
                raise Phi3ExportError(f"{index}: 'weight_map' must be an object mapping tensor names to shard files, got {got}")
            names = set()
            for tensor, shard in weight_map.items():
                entry = f"{index}: weight_map entry {_short(tensor)}"
                if not isinstance(shard, str) or not shard or "\0" in shard:
                    raise Phi3ExportError(f"{entry}: shard must be a file name, got {_short(shard)}")
                if Path(shard).is_absolute() or ".." in Path(shard).parts:
                    raise Phi3ExportError(f"{entry}: shard {_short(shard)} is not a path inside the checkpoint folder")
                if not shard.endswith(".safetensors"):
                    raise Phi3ExportError(f"{entry}: shard {_short(shard)} is not a .safetensors file")
                names.add(shard)
            shards = []
            for shard in sorted(names):
                path = self.folder / shard
                if not path.is_file():
                    raise Phi3ExportError(f"{index}: lists shard {shard} which is missing")
                shards.append(self._contained(path, index, shard))
            return shards
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            return [self._contained(s, s) for s in shards]
        pickles = [p.name for p in sorted(self.folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise Phi3ExportError(
                f"{self.folder / pickles[0]}: pickle checkpoints are refused (loading them can run code); "
                "convert to safetensors first"
            )
        raise Phi3ExportError(f"{self.folder}: no *.safetensors weights found")

    def _check_tokenizer_files(self) -> None:
        """Tokenizer and licence files are read here and copied into every artifact: each must be
        inside the folder, and each JSON one an object whose fields the exporters read are typed."""
        for name in (*TOKENIZER_FILES, *LICENSE_FILES):
            path = self.folder / name
            if path.is_symlink() or path.exists():
                self._contained(path, path)
                if not path.is_file():
                    raise Phi3ExportError(f"{path}: not a regular file")
        for name in JSON_TOKENIZER_FILES:
            if (self.folder / name).is_file():
                doc = _read_json(self.folder / name)
                _check_tokenizer_json(self.folder / name, doc)
                if name == "tokenizer.json":  # parsed once: a real one is megabytes
                    self._tokenizer_json_kind = _tokenizer_kind(doc)
        template = self.folder / "chat_template.jinja"
        if template.is_file():
            try:
                template.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Phi3ExportError(f"{template}: not UTF-8 text (byte {exc.start})") from None

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._require(name)["shape"])

    def dtype_name(self, name: str) -> str:
        return self._require(name)["dtype"]

    def shard_of(self, name: str) -> Path:
        self._require(name)
        return self._where[name]

    def torch_dtype(self, name: str) -> torch.dtype:
        """The tensor's float dtype (``check_tensors`` has refused any other dtype for a plan tensor)."""
        dtype = self.dtype_name(name)
        if dtype not in FLOAT_DTYPES:
            raise Phi3ExportError(f"{self.shard_of(name)}: tensor {name!r} is {dtype}, not a float dtype "
                                  f"({'/'.join(FLOAT_DTYPES)})")
        return FLOAT_DTYPES[dtype]

    def _require(self, name: str) -> dict[str, Any]:
        try:
            return self._headers[name]
        except KeyError:
            raise Phi3ExportError(f"{self.folder}: tensor {name!r} not found in the checkpoint") from None

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One tensor, copied out of the mapped shard (converted to ``dtype`` unless None)."""
        self._require(name)
        shard = self._where[name]
        handle = self._open.get(shard)
        if handle is None:
            handle = self._open[shard] = safe_open(str(shard), framework="pt")
        tensor = handle.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor, without reading the rest."""
        self._require(name)
        shard = self._where[name]
        handle = self._open.get(shard)
        if handle is None:
            handle = self._open[shard] = safe_open(str(shard), framework="pt")
        return handle.get_slice(name)[start:stop].to(dtype)

    def gather_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) of a 2-D table, fp32, reading only the distinct rows needed."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.stack([self.rows(name, int(t), int(t) + 1)[0] for t in unique])
        return rows[inverse]

    def identity(self) -> str:
        """A digest that tells this checkpoint's weights from another's, for resume and cache keys.

        config.json, then per shard its name, size, and IDENTITY_SAMPLES slices of
        IDENTITY_SAMPLE_BYTES spread over the file (its safetensors header is the first). Hashing every byte would cost
        minutes at 42B parameters; two checkpoints of one config (a fine-tune, a re-save in another
        dtype) differ in nearly every weight, so a few MB of samples tell them apart."""
        import hashlib

        if self._identity is not None:  # a run asks twice (resume fingerprint, budget cache key)
            return self._identity
        h = hashlib.sha256((self.folder / "config.json").read_bytes())
        for shard in self._shards:
            size = shard.stat().st_size
            h.update(f"{shard.name}:{size}".encode())
            with open(shard, "rb") as f:
                for k in range(IDENTITY_SAMPLES):
                    span = size - IDENTITY_SAMPLE_BYTES
                    f.seek(span * k // (IDENTITY_SAMPLES - 1) if span > 0 else 0)
                    h.update(f.read(IDENTITY_SAMPLE_BYTES))
        self._identity = h.hexdigest()
        return self._identity

    def close(self) -> None:
        """Drop the open shards: unmaps them, so pages read so far leave this process's RSS."""
        self._open.clear()

    @property
    def tokenizer_kind(self) -> str:
        """Byte-level BPE (Phi-4-mini, Phi-3-small) or Llama sentencepiece-style BPE."""
        if self._tokenizer_json_kind is not None:
            return self._tokenizer_json_kind
        return "llama-sentencepiece" if (self.folder / "tokenizer.model").is_file() else "unknown"

    @property
    def tokenizer_folder(self) -> Path:
        """Where tokenizer.json and tokenizer_config.json are read from: the checkpoint folder, or
        the temporary folder ``use_tiktoken`` built them in."""
        return Path(self._built.name) if self._built is not None else self.folder

    def tokenizer_files(self) -> Iterator[Path]:
        """The files an artifact carries: the built tokenizer's in place of the folder's own."""
        for name in TOKENIZER_FILES:
            if self._built is not None and name in BUILT_TOKENIZER_REPLACES:
                if (self.tokenizer_folder / name).is_file():
                    yield self.tokenizer_folder / name
            elif (self.folder / name).is_file():
                yield self.folder / name

    def use_tiktoken(self, spec: TiktokenSpec) -> None:
        """Build tokenizer.json from tiktoken ranks (``--tiktoken-file``, else the folder's
        ``spec.ranks_file``) into a temporary folder: for a checkpoint without tokenizer.json
        whose architecture's tokenizer is ``spec``. The chat template is the folder's own
        (chat_template.jinja, then tokenizer_config.json) when it has one."""
        from phi3_export.checkpoint.tiktoken import build_tokenizer

        ranks = self.tiktoken_file
        if ranks is None and (self.folder / spec.ranks_file).is_file():
            ranks = self._contained(self.folder / spec.ranks_file, self.folder / spec.ranks_file)
        if ranks is None:
            raise Phi3ExportError(f"{self.folder}: no tokenizer.json: {spec.model}'s tokenizer is tiktoken's "
                                  f"{Path(spec.ranks_file).stem} ranks: put {spec.ranks_file} in the folder or pass --tiktoken-file")
        template, tok_config = None, self.folder / "tokenizer_config.json"
        if (self.folder / "chat_template.jinja").is_file():
            template = (self.folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif tok_config.is_file() and isinstance(_read_json(tok_config).get("chat_template"), str):
            template = _read_json(tok_config)["chat_template"]
        built = tempfile.TemporaryDirectory(prefix="phi3-export-tokenizer-")
        length = self.config.get("max_position_embeddings")
        build_tokenizer(ranks, spec, Path(built.name), vocab_size=self.config["vocab_size"], chat_template=template,
                        model_max_length=length if _is_count(length) else None)
        self._built = built
        self._tokenizer_json_kind = _tokenizer_kind(_read_json(Path(built.name) / "tokenizer.json"))

    def license_file(self) -> Path | None:
        return next((self.folder / n for n in LICENSE_FILES if (self.folder / n).is_file()), None)

    def fixture_recipe(self) -> str | None:
        """The recipe a test fixture scales down (recorded by `phi3-export fixture`)."""
        fixture = self.config.get("phi3_export_fixture")
        recipe = fixture.get("recipe") if isinstance(fixture, dict) else None
        return recipe if isinstance(recipe, str) else None


def _tokenizer_kind(spec: dict[str, Any]) -> str:
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return "byte-bpe" if "ByteLevel" in text else "llama-sentencepiece"


def _check_tokenizer_json(path: Path, doc: dict[str, Any]) -> None:
    """The fields of a tokenizer JSON file that phi3-export or onnxruntime-genai read, by type."""
    def bad(key: str, want: str, value: object) -> Phi3ExportError:
        return Phi3ExportError(f"{path}: {key!r} must be {want}, got a JSON {_json_type(value)}")

    if path.name == "tokenizer.json":
        added = doc.get("added_tokens", [])
        if not isinstance(added, list):
            raise bad("added_tokens", "a list", added)
        for i, token in enumerate(added):
            if not (isinstance(token, dict) and isinstance(token.get("content"), str) and _is_count(token.get("id"))):
                raise Phi3ExportError(f"{path}: added_tokens[{i}] must be an object with a string 'content' "
                                      "and a non-negative integer 'id'")
        if not isinstance(doc.get("model"), dict):
            raise bad("model", "an object", doc.get("model"))
    if path.name == "tokenizer_config.json":
        template = doc.get("chat_template")
        if template is not None and not isinstance(template, str) and not (
            isinstance(template, list)
            and all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                    for t in template)):
            raise bad("chat_template", "a string (or a list of {name, template} objects)", template)
        decoder = doc.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict) or not all(isinstance(t, dict) for t in decoder.values()):
            raise bad("added_tokens_decoder", "an object of token objects", decoder)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = doc.get(key)
        if value is not None and not isinstance(value, (str, dict)):
            raise bad(key, "a string or an object", value)
    if path.name in ("tokenizer_config.json", "special_tokens_map.json"):
        for key in ("add_bos_token", "add_eos_token"):
            if key in doc and not isinstance(doc[key], bool):
                raise bad(key, "true or false", doc[key])
    if path.name == "generation_config.json":
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = doc.get(key)
            ok = value is None or _is_count(value) or (isinstance(value, list) and all(_is_count(v) for v in value))
            if not ok:
                raise bad(key, "a token id or a list of them", value)
