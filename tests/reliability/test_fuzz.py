"""Property-based fuzzing of the readers that take files from outside: the safetensors header reader (through
`Checkpoint`), the recipe loader (`parse_recipe`), the manifest reader (`find_artifacts`) and the bundle
check (`verify_bundle`).

Properties, for every generated input:
- the only exception is Phi3ExportError (a one-line error for the user); `verify_bundle` raises
  nothing: damage is a problem in its result;
- peak Python allocation stays within 10x the input's size plus a constant (tracemalloc): no
  header length, alias or nesting makes the reader allocate what the file does not hold;
- what is accepted is sound: a header's tensors tile the file's data exactly; an artifact found
  through a manifest is inside the OUT folder; a manifest that is not a bundle's, or names a file
  outside the bundle, does not verify.

Examples are bounded (derandomized, no example database) so CI stays fast and repeatable; the
``*_pinned`` tests run the known hostile shapes (bombs, escapes, wrong types) through the same checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import tempfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from reliability_harness import BILLION_LAUGHS, PYTHON_APPLY, PYTHON_NAME, deep_json, sha256

from phi3_export.errors import Phi3ExportError

# No example database and no .hypothesis/ folder in the checkout (hypothesis caches literals there).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "phi3-export-hypothesis")
FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
SLACK = 4 << 20  # the constant of the allocation bound: bookkeeping, and a 1 MiB read buffer when hashing a file


@contextmanager
def allocation_bound(input_bytes: int):
    """Fail if peak Python allocation inside the block exceeds 10x ``input_bytes`` + SLACK."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= 10 * input_bytes + SLACK, f"peak allocation {peak:,} bytes for {input_bytes:,} bytes of input"


def json_values(max_leaves: int = 12):
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                        max_leaves=max_leaves)


def json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# --- the safetensors header reader ---------------------------------------------------------------------------------

# safetensors' dtypes with whole-byte elements, and their sizes (the format's own table).
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
            "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "X99", "f32", "", "F4"]
counts = st.integers(0, 6) | st.integers(-3, 2**66) | st.just(2**64 - 1)


@st.composite
def tensor_entries(draw):
    """Mostly well-formed entries (so the checks past the first are reached), some broken in one field."""
    dtype = draw(st.sampled_from(DTYPES[:5]) | st.sampled_from(DTYPES) | json_values(2))
    shape = draw(st.lists(st.integers(0, 5), max_size=3) | st.lists(counts, max_size=4) | json_values(3))
    begin = draw(st.integers(0, 64) | counts)
    nbytes = math.prod(shape) * ITEMSIZE.get(dtype, 1) if isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape) and isinstance(dtype, str) else 4
    end = draw(st.just(begin + nbytes) | counts)
    offsets = draw(st.just([begin, end]) | st.just([begin, end]) | st.lists(counts, max_size=3) | json_values(3))
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    for key in draw(st.sets(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        del entry[key]
    return entry


@st.composite
def tiled_headers(draw) -> tuple[dict, int]:
    """A well-formed header (tensors laid end to end from offset 0) and its data length, then at most one
    corruption: every check of the reader is reached, and some files are valid."""
    header, position = {}, 0
    for name in draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    data_len = position
    names = sorted(header)
    corruption = draw(st.sampled_from(["none", "none", "offset", "dtype", "shape", "field", "data", "entry"]))
    if corruption == "data":
        data_len = max(0, data_len + draw(st.integers(-8, 8)))
    elif names and corruption != "none":
        entry = header[draw(st.sampled_from(names))]
        if corruption == "offset":
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-4, 4) | counts)
        elif corruption == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES) | json_values(1))
        elif corruption == "shape":
            entry["shape"] = draw(st.lists(counts, max_size=4) | json_values(2))
        elif corruption == "field":
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        else:
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values(2))
    return header, data_len


@st.composite
def safetensors_files(draw) -> bytes:
    kind = draw(st.sampled_from(["tiled", "tiled", "tiled", "entries", "json", "bytes"]))
    if kind == "tiled":
        header, data_len = draw(tiled_headers())
        if draw(st.integers(0, 3)) == 0:
            header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | json_values(3))
        blob = json_bytes(header)
    elif kind == "entries":
        blob = json_bytes(draw(st.dictionaries(st.text(max_size=10), tensor_entries(), max_size=4)))
        data_len = draw(st.integers(0, 512))
    elif kind == "json":
        blob, data_len = json_bytes(draw(json_values())), draw(st.integers(0, 64))
    else:
        blob, data_len = draw(st.binary(max_size=200)), draw(st.integers(0, 64))
    length = len(blob) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1) | st.integers(0, len(blob) + 8))
    raw = struct.pack("<Q", length) + blob + bytes(data_len)
    return raw[: draw(st.integers(0, len(raw)))] if draw(st.integers(0, 9)) == 0 else raw  # truncated


@pytest.fixture(scope="module")
def checkpoint_folder(fixture_dir):
    """A real checkpoint's config.json beside the crafted model.safetensors (rewritten per example)."""
    folder = Path(tempfile.mkdtemp(prefix="phi3-fuzz-ckpt-"))
    shutil.copy(fixture_dir("phi-3-mini-4k") / "config.json", folder / "config.json")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def open_checkpoint(folder: Path, raw: bytes):
    from phi3_export.checkpoint import Checkpoint

    (folder / "model.safetensors").write_bytes(raw)
    return Checkpoint(folder)


def assert_header_sound(ckpt, raw: bytes) -> None:
    """An accepted header: known dtypes, shapes whose bytes are the offsets' span, tensors tiling the data exactly."""
    (header_len,) = struct.unpack("<Q", raw[:8])
    data_len, position = len(raw) - 8 - header_len, 0
    for name in sorted(ckpt.names, key=lambda n: ckpt._headers[n]["data_offsets"][0]):
        info = ckpt._headers[name]
        begin, end = info["data_offsets"]
        assert info["dtype"] in ITEMSIZE, f"{name}: unknown dtype accepted: {info}"
        assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]), info
        assert begin == position and end >= begin, f"{name}: {info} does not follow the tensor before it"
        assert end - begin == math.prod(info["shape"]) * ITEMSIZE[info["dtype"]], f"{name}: size disagrees with shape: {info}"
        position = end
    assert position == data_len, f"the tensors cover {position} bytes of {data_len}"


def test_header_reader_positive_control(checkpoint_folder, fixture_dir):
    """The fixture's own safetensors file is accepted by the same harness: the fuzz is not vacuous."""
    raw = (fixture_dir("phi-3-mini-4k") / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(checkpoint_folder, raw)
    assert len(ckpt.names) > 5
    assert_header_sound(ckpt, raw)


def st_file(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def check_header_reader(folder: Path, raw: bytes) -> None:
    try:
        with allocation_bound(len(raw)):
            ckpt = open_checkpoint(folder, raw)
    except Phi3ExportError:
        return
    assert_header_sound(ckpt, raw)


@FUZZ
@given(raw=safetensors_files())
def test_safetensors_header_reader(raw: bytes, checkpoint_folder):
    check_header_reader(checkpoint_folder, raw)


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
PINNED_HEADERS = {
    "length-u64-max": st_file(b"{}", length=2**64 - 1),
    "length-near-limit": st_file(b"{" + b" " * 100, length=99_999_999),
    "a-list": st_file(b"[]"),
    "nesting-bomb": st_file(deep_json(100_000).encode()),
    "not-utf8": st_file(b'"\xff"'),
    "shape-huge-offsets-small": st_file(json_bytes({"a": {**F32_1, "shape": [2**40, 2**40]}}), bytes(4)),
    "two-tensors-one-span": st_file(json_bytes({"a": F32_1, "b": F32_1}), bytes(4)),
    "shape-of-booleans": st_file(json_bytes({"a": {**F32_1, "shape": [True]}}), bytes(4)),
    "offsets-floats": st_file(json_bytes({"a": {**F32_1, "data_offsets": [0.0, 4.0]}}), bytes(4)),
    "metadata-not-strings": st_file(json_bytes({"__metadata__": {"format": ["pt"]}})),
    "integer-of-5000-digits": st_file(b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}',
                                      bytes(4)),
}


@pytest.mark.parametrize("raw", PINNED_HEADERS.values(), ids=PINNED_HEADERS.keys())
def test_safetensors_header_reader_pinned(raw: bytes, checkpoint_folder):
    check_header_reader(checkpoint_folder, raw)


# --- the recipe loader ---------------------------------------------------------------------------------------------

def _shipped_recipe_doc() -> dict:
    import yaml

    from phi3_export.recipes import recipes_dir

    return yaml.safe_load((recipes_dir() / "phi-3-mini-4k.yaml").read_text())


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))


@st.composite
def recipe_texts(draw) -> str:
    import yaml

    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "text", "anchors"]))
    if kind == "text":
        return draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
    if kind == "anchors":
        depth, breadth = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * breadth)}]" for i in range(1, depth + 1)]
        field = draw(st.sampled_from(["description", "name", "model", "export", "quantization"]))
        return "\n".join(lines) + f"\n{field}: *l{depth}\n"
    doc = _shipped_recipe_doc()
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values(6))
        else:
            parent.pop(path[-1], None)
    return yaml.safe_dump(doc, allow_unicode=True)


def check_recipe_loader(text: str, bound: bool = True) -> None:
    from phi3_export.recipes.loader import parse_recipe
    from phi3_export.recipes.schema import Recipe

    try:
        if bound:
            with allocation_bound(len(text.encode("utf-8", "surrogatepass"))):
                recipe = parse_recipe(text, "fuzz.yaml")
        else:
            recipe = parse_recipe(text, "fuzz.yaml")
    except Phi3ExportError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.yaml"), f"not one line naming the file: {str(exc)[:300]!r}"
        return
    assert isinstance(recipe, Recipe)


@FUZZ
@given(text=recipe_texts())
def test_recipe_loader(text: str):
    check_recipe_loader(text)


PINNED_RECIPES = {
    "billion-laughs": BILLION_LAUGHS,
    "python-object-apply": PYTHON_APPLY,
    "python-name": PYTHON_NAME,
    "integer-of-4400-digits": "name: x\nmodel: {num_layers: " + "1" * 4400 + "}\n",
    "recursive-alias": "a: &a {b: *a}\n",
    "nul-character": "name: \x00\n",
    "binary-tag": "name: !!binary AAAA\n",
    "merge-of-unknown-alias": "<<: [*x]\n",
    "empty": "",
}


@pytest.mark.parametrize("text", PINNED_RECIPES.values(), ids=PINNED_RECIPES.keys())
def test_recipe_loader_pinned(text: str):
    check_recipe_loader(text)


def test_recipe_loader_nesting_bomb():
    """1000 nested flow lists: PyYAML's composer recurses once per level (no allocation bound: tracemalloc makes
    the unwinding of a RecursionError take seconds)."""
    check_recipe_loader(deep_json(1_000), bound=False)


# --- the manifest reader ---------------------------------------------------------------------------------------------

ARTIFACT_PATHS = ["onnx-cpu", "onnx-cpu/", "./onnx-cpu", "../outside", "onnx-cpu/../../outside", "/", ".", "", "missing",
                  "onnx-cpu/model.onnx", "link-out"]


@st.composite
def quantize_manifests(draw) -> bytes:
    kind = draw(st.sampled_from(["structured", "structured", "structured", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json_bytes(draw(json_values()))
    entry = st.fixed_dictionaries(
        {"name": st.text(max_size=10) | json_values(2), "path": st.sampled_from(ARTIFACT_PATHS) | json_values(2)},
        optional={"format": st.sampled_from(["onnx", "coreml", "x"]), "target": st.sampled_from(["cpu", "mobile", None]),
                  "files": json_values(4)})
    doc = {"tool": {"name": "phi3-export"}, "artifacts": draw(st.lists(entry, max_size=3) | json_values(3))}
    if draw(st.booleans()):
        doc.pop(draw(st.sampled_from(["tool", "artifacts"])))
    return json_bytes(doc)


@pytest.fixture(scope="module")
def out_folder():
    """An OUT folder (with onnx-cpu/), a folder beside it and a link out of it; manifest.json rewritten per example."""
    root = Path(tempfile.mkdtemp(prefix="phi3-fuzz-out-"))
    out = root / "out"
    (out / "onnx-cpu").mkdir(parents=True)
    (out / "onnx-cpu" / "genai_config.json").write_text("{}")
    (root / "outside").mkdir()
    (out / "link-out").symlink_to(root / "outside", target_is_directory=True)
    yield out
    shutil.rmtree(root, ignore_errors=True)


def check_manifest_reader(out_folder: Path, raw: bytes, where: str) -> None:
    from phi3_export.manifest import find_artifacts

    (out_folder / "manifest.json").write_bytes(raw)
    path = out_folder if where == "out" else out_folder / where
    try:
        with allocation_bound(len(raw)):
            artifacts = find_artifacts(path)
    except Phi3ExportError:
        return
    root = out_folder.resolve()
    for artifact in artifacts:
        assert artifact.folder.resolve().is_relative_to(root), f"{artifact.folder} is outside {out_folder}"


@FUZZ
@given(raw=quantize_manifests(), where=st.sampled_from(["out", "onnx-cpu", "missing"]))
def test_manifest_reader(raw: bytes, where: str, out_folder: Path):
    check_manifest_reader(out_folder, raw, where)


PINNED_MANIFESTS = {
    "nesting-bomb": (deep_json(100_000).encode(), "out"),
    "not-utf8": (b'{"artifacts": ["\xff"]}', "out"),
    "path-outside": (b'{"artifacts": [{"name": "x", "path": "../outside"}]}', "out"),
    "path-absolute": (b'{"artifacts": [{"name": "x", "path": "/"}]}', "out"),
    "path-through-a-link-out": (b'{"artifacts": [{"name": "x", "path": "link-out"}]}', "out"),
    "entry-a-string": (b'{"artifacts": ["onnx-cpu"]}', "out"),
    "entry-without-name": (b'{"artifacts": [{"path": "onnx-cpu"}]}', "onnx-cpu"),
    "path-a-number": (b'{"artifacts": [{"name": "x", "path": 7}]}', "out"),
}


@pytest.mark.parametrize("raw,where", PINNED_MANIFESTS.values(), ids=PINNED_MANIFESTS.keys())
def test_manifest_reader_pinned(raw: bytes, where: str, out_folder: Path):
    check_manifest_reader(out_folder, raw, where)


# --- the bundle check -------------------------------------------------------------------------------------------------

SECRET = b"outside the bundle\n"
FILE_PATHS = ["onnx/tokenizer.json", "onnx/genai_config.json", "a.txt", "missing.txt", "onnx", "../secret.txt", "SECRET_ABS",
              "onnx/../a.txt", "", "."]


@pytest.fixture(scope="module")
def bundle_folder():
    """A bundle (onnx/ with broken loader files, a.txt) and secret.txt beside it; manifest.json rewritten per example."""
    root = Path(tempfile.mkdtemp(prefix="phi3-fuzz-bundle-"))
    bundle = root / "bundle"
    (bundle / "onnx").mkdir(parents=True)
    (bundle / "onnx" / "genai_config.json").write_text("{broken")  # onnxruntime-genai is never reached
    (bundle / "onnx" / "tokenizer.json").write_text("{broken")
    (bundle / "a.txt").write_text("a")
    (root / "secret.txt").write_bytes(SECRET)
    (root / "outside").mkdir()
    yield bundle
    shutil.rmtree(root, ignore_errors=True)


def _real(bundle: Path, path: str) -> Path:
    return bundle.parent / "secret.txt" if path == "SECRET_ABS" else bundle / path


@st.composite
def bundle_manifests(draw, bundle: Path) -> tuple[bytes, bool, bool]:
    """(manifest bytes, is it shaped like a bundle manifest, does a file entry leave the bundle)."""
    kind = draw(st.sampled_from(["structured", "structured", "structured", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), False, False
    if kind == "json":
        return json_bytes(draw(json_values())), False, False
    files = []
    for path in draw(st.lists(st.sampled_from(FILE_PATHS), max_size=4)):
        real = _real(bundle, path)
        right = real.is_file()
        entry = {"path": str(real) if path == "SECRET_ABS" else path,
                 "size": draw(st.just(real.stat().st_size if right else 1) | st.integers(-2, 2**70) | json_values(1)),
                 "sha256": draw(st.just(sha256(real) if right else "0" * 64) | json_values(1))}
        for key in draw(st.sets(st.sampled_from(["path", "size", "sha256"]), max_size=1)):
            del entry[key]
        files.append(entry)
    model = st.fixed_dictionaries({"folder": st.sampled_from(["onnx", "../outside", "/", "nope", ""]) | json_values(1),
                                   "format": st.sampled_from(["onnx", "coreml", "x"]) | json_values(1)})
    doc = {"format": draw(st.sampled_from(["phi3-export-bundle", "other"])), "files": files,
           "models": draw(st.lists(model, max_size=2) | json_values(2))}
    escapes = any(isinstance(e.get("path"), str) and (e["path"].startswith("/") or ".." in Path(e["path"]).parts) for e in files)
    shaped = doc["format"] == "phi3-export-bundle"
    return json_bytes(doc), shaped, escapes


@pytest.fixture(scope="module")
def warm_verify(bundle_folder):
    """Import what verify imports (tokenizers, coremltools) before the allocation bound is measured."""
    from phi3_export.package.verify import verify_bundle

    (bundle_folder / "manifest.json").write_text(json.dumps(
        {"format": "phi3-export-bundle", "files": [], "models": [{"folder": "onnx", "format": "onnx"},
                                                                  {"folder": "onnx", "format": "coreml"}]}))
    verify_bundle(bundle_folder)
    return verify_bundle


PINNED_BUNDLE_MANIFESTS = {
    "nesting-bomb": deep_json(100_000).encode(),
    "a-list": b"[]",
    "empty-object": b"{}",
    "files-a-dict": b'{"format": "phi3-export-bundle", "files": {"a": 1}}',
    "not-utf8": b"\xff\xfe",
    "entry-outside": json_bytes({"format": "phi3-export-bundle", "files": [
        {"path": "../secret.txt", "size": len(SECRET), "sha256": hashlib.sha256(SECRET).hexdigest()}]}),
    "entry-without-size": json_bytes({"format": "phi3-export-bundle", "files": [{"path": "a.txt", "sha256": "0" * 64}]}),
}


@pytest.mark.parametrize("raw", PINNED_BUNDLE_MANIFESTS.values(), ids=PINNED_BUNDLE_MANIFESTS.keys())
def test_verify_bundle_pinned(raw: bytes, bundle_folder, warm_verify):
    (bundle_folder / "manifest.json").write_bytes(raw)
    result = warm_verify(bundle_folder)  # never raises
    assert result.problems, f"{raw[:80]!r} verified"


@FUZZ
@given(data=st.data())
def test_verify_bundle(data, bundle_folder, warm_verify):
    raw, shaped, escapes = data.draw(bundle_manifests(bundle_folder))
    (bundle_folder / "manifest.json").write_bytes(raw)
    with allocation_bound(len(raw)):
        result = warm_verify(bundle_folder)  # never raises: damage is a problem in the result
    assert isinstance(result.problems, list) and all(isinstance(p, str) and "\n" not in p for p in result.problems)
    if not shaped or escapes:
        assert result.problems, f"verified a manifest that {'names a file outside the bundle' if escapes else 'is not a bundle'}"
