"""Golden exports: the Phi-3 family's int4 ONNX and Core ML artifacts, byte for byte.

``tests/golden/phi3.json`` holds digests of what ``quantize(fixture, out, bits=4, formats=("onnx", "coreml"),
targets=("cpu",))`` writes for a tiny fixture (``make_fixture`` defaults: 2 layers, default hidden size,
train_steps=0, seed 0: a deterministic random init) of each recipe in ``RECIPES``, with RTN and the
recipe's own defaults otherwise. The test exports them again and compares.

What a pass proves: every file of every export (``model.onnx``, ``model.onnx.data``, ``genai_config.json``, every
file inside ``model.mlpackage``, the tokenizer and config copies, ``manifest.json``) is byte-identical to the
recorded one: the ``files`` section. The ``fixture`` section holds the fixture checkpoints' files, the test's
*input*: when it differs, the fixture builder changed, not (necessarily) the exporters. The rest of each case (ONNX
nodes in graph order, node and initializer digests, graph IO; the Core ML program's ops, constant values, metadata
and IO) is there only so that a failure names *what* changed: the first differing node, which initializers or
constants, which package file.

Regenerate (from the repository root, with the code whose exports are to be recorded):

    PYTHONPATH=. python tests/test_golden.py --write

It exports everything twice, in two processes with different hash seeds and temp folders, and writes the
file only if both agree. Regenerating is legitimate only when a change to the exports is intended (say so
in the commit, with the reason); a refactor must pass against the existing file unchanged. Upgrading a
library that shapes the artifacts (torch, onnx, coremltools, ...) can also change them: the failure message
then lists the versions that differ from the ones the file was recorded with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "phi3.json"
RECIPES = ("phi-3-mini-4k", "phi-3-mini-128k", "phi-3-medium-4k", "phi-4-mini")
EXPORT = {"bits": 4, "formats": ("onnx", "coreml"), "targets": ("cpu",)}
ONNX_ARTIFACT = "onnx-cpu"
PACKAGE = "coreml/model.mlpackage"
SPEC = "Data/com.apple.CoreML/model.mlmodel"
# Libraries whose version can change the bytes of an export (informational: recorded, shown on a failure).
LIBRARIES = ("torch", "numpy", "safetensors", "transformers", "tokenizers", "onnx", "coremltools", "protobuf")
BLOB_SENTINEL = 0xDEADBEEF  # start of each blob's metadata in a Core ML weight file
SHOWN = 8  # names listed per difference in a failure message
SECTIONS = ("fixture", "files", "onnx", "coreml")  # of each case, in the order a failure reports them


# ---- digests (shared by the test and the generator) -----------------------------------------------------------------
def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _short(*parts: bytes) -> str:
    """A 16-hex-digit digest for the diagnostic sections (the file digests are the full sha256)."""
    return _sha256(*parts)[:16]


def file_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): _sha256(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _by_name(items, name_of) -> dict:
    """Items keyed by name; a repeated name gets ``#2``, ``#3``... so that no item is lost."""
    out, seen = {}, {}
    for item in items:
        name = name_of(item)
        seen[name] = seen.get(name, 0) + 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = item
    return out


def onnx_digest(folder: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    graph = model.graph

    def tensor(t) -> str:
        a = numpy_helper.to_array(t)
        return f"{a.dtype}{list(a.shape)} " + _sha256(a.dtype.str.encode(), repr(a.shape).encode(), a.tobytes())

    return {
        "model": {"ir_version": model.ir_version, "producer": f"{model.producer_name} {model.producer_version}".strip(),
                  "opsets": [f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import]},
        "inputs": [i.name for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "nodes": [f"{n.op_type} {n.name}" for n in graph.node],
        # Inputs, outputs, attributes and domain of each node: catches a change the node list does not show.
        "node_digests": {k: _short(n.SerializeToString(deterministic=True)) for k, n in _by_name(graph.node, lambda n: n.name).items()},
        "initializers": {k: tensor(t) for k, t in _by_name(graph.initializer, lambda t: t.name).items()},
    }


def _blob(package: Path, blob, cache_: dict[str, bytes]) -> bytes:
    """The raw bytes of one blob in a Core ML weight file (MIL blob storage: 64-byte metadata before each blob)."""
    name = blob.fileName.removeprefix("@model_path/")
    if name not in cache_:
        cache_[name] = (package / Path(SPEC).parent / name).read_bytes()
    data = cache_[name]
    sentinel, _dtype, size, offset = struct.unpack_from("<IIQQ", data, blob.offset)
    if sentinel != BLOB_SENTINEL:
        raise ValueError(f"{name}: no blob metadata at offset {blob.offset}")
    return data[offset : offset + size]


def coreml_digest(package: Path) -> dict:
    from coremltools.proto import MIL_pb2, Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / SPEC).read_bytes())
    desc, meta = spec.description, spec.description.metadata
    weights: dict[str, bytes] = {}

    def value(v) -> str:
        if v.type.HasField("tensorType"):
            t = v.type.tensorType
            kind = MIL_pb2.DataType.Name(t.dataType) + str([d.constant.size if d.HasField("constant") else "?" for d in t.dimensions])
        else:
            kind = v.type.WhichOneof("type") or "value"
        data = _blob(package, v.blobFileValue, weights) if v.HasField("blobFileValue") else v.immediateValue.SerializeToString(deterministic=True)
        return f"{kind} " + _short(kind.encode(), data)

    def function(fn) -> dict:
        block = fn.block_specializations[fn.opset]
        named = _by_name(block.operations, lambda op: op.outputs[0].name if op.outputs else f"<{op.type}>")
        # Constant values by const op output, and inline inputs (the int4 weights' data, scale, offset) as "op.input":
        # a blob's bytes, not its offset in weight.bin, so one changed constant does not show as all those after it.
        values, digests = {}, {}
        for k, op in named.items():
            if op.type == "const":
                values[k] = value(op.attributes["val"])
                continue
            op = MIL_pb2.Operation.FromString(op.SerializeToString())
            for key, binding in sorted(op.inputs.items()):
                for j, arg in enumerate(binding.arguments):
                    if arg.HasField("value"):
                        values[f"{k}.{key}" + (f"[{j}]" if len(binding.arguments) > 1 else "")] = value(arg.value)
                        if arg.value.HasField("blobFileValue"):
                            arg.value.blobFileValue.offset = 0
            # The op's inputs, outputs and their types, attributes (its blobs' offsets left out, as above).
            digests[k] = _short(op.SerializeToString(deterministic=True))
        return {
            "opset": fn.opset,
            "inputs": [i.name for i in fn.inputs],
            "outputs": list(block.outputs),
            "ops": [f"{op.type} {op.outputs[0].name if op.outputs else '-'}" for op in block.operations],
            "op_digests": digests,
            "values": values,
        }

    return {
        "specification_version": spec.specificationVersion,
        "metadata": {"author": meta.author, "short_description": meta.shortDescription, "version": meta.versionString,
                     "license": meta.license, "user_defined": dict(sorted(meta.userDefined.items()))},
        "inputs": {f.name: _short(f.SerializeToString(deterministic=True)) for f in desc.input},
        "outputs": {f.name: _short(f.SerializeToString(deterministic=True)) for f in desc.output},
        "states": {f.name: _short(f.SerializeToString(deterministic=True)) for f in desc.state},
        "functions": {name: function(fn) for name, fn in sorted(spec.mlProgram.functions.items())},
    }


def export_digest(fixture: Path, out: Path) -> dict:
    """Everything recorded for one export: its input (the fixture checkpoint) and its output folder (quantize's ``out``)."""
    out = Path(out)
    return {"fixture": file_digests(Path(fixture)), "files": file_digests(out), "onnx": onnx_digest(out / ONNX_ARTIFACT),
            "coreml": coreml_digest(out / PACKAGE)}


def library_versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---- comparison ------------------------------------------------------------------------------------------------------
def _abbrev(v) -> str:
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{4,}\b", r"\1…", v if isinstance(v, str) else repr(v))


def _few(items: list[str]) -> str:
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def differences(want, got, path: str) -> list[str]:
    """Human-readable differences of two digest trees: missing/new/changed names, a list's first differing entry."""
    if isinstance(want, dict) and isinstance(got, dict):
        found = []
        missing, new = [k for k in want if k not in got], [k for k in got if k not in want]
        changed = [k for k in got if k in want and want[k] != got[k]]  # in the order the digests are made
        leaves = [k for k in changed if not isinstance(want[k], dict | list) or not isinstance(got[k], dict | list)]
        if missing:
            found.append(f"{path}: in the golden file, not produced now ({len(missing)}): {_few(missing)}")
        if new:
            found.append(f"{path}: produced now, not in the golden file ({len(new)}): {_few(new)}")
        if leaves:
            show = [k if path == "files" else f"{k} (golden {_abbrev(want[k])}, now {_abbrev(got[k])})" for k in leaves]
            found.append(f"{path}: differs ({len(leaves)}): {_few(show)}")
        for k in changed:
            if k not in leaves:
                found += differences(want[k], got[k], f"{path}.{k}")
        return found
    if isinstance(want, list) and isinstance(got, list):
        i = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        a = repr(want[i]) if i < len(want) else "<end>"
        b = repr(got[i]) if i < len(got) else "<end>"
        return [f"{path}: first difference at [{i}]: golden {a}, now {b} (golden {len(want)} entries, now {len(got)})"]
    return [f"{path}: golden {_abbrev(want)}, now {_abbrev(got)}"]


# A changed file whose section (which names causes) agrees: what is left to look at.
_HINTS = (
    (f"{ONNX_ARTIFACT}/model.onnx", "onnx",
     "model.onnx differs, its nodes, initializers and IO agree: look at value_info, initializer order, external-data offsets"),
    (f"{ONNX_ARTIFACT}/model.onnx.data", "onnx",
     "model.onnx.data differs, every initializer's value agrees: the layout (tensor order, alignment, padding) changed"),
    (f"{PACKAGE}/{SPEC}", "coreml",
     "model.mlmodel differs, its ops, constants, metadata and IO agree: look at nested blocks or other spec fields"),
    (f"{PACKAGE}/Data/com.apple.CoreML/weights/weight.bin", "coreml",
     "weight.bin differs, every constant's value agrees: the blob order or alignment changed"),
)


def report(case: str, want: dict, got: dict, recorded_versions: dict, against: str = "") -> list[str]:
    """Empty when ``got`` matches the golden ``want``; else lines that say what differs."""
    found = []
    for section in SECTIONS:
        found += differences(want.get(section), got.get(section), section)
    if not found:
        return []
    if want.get("fixture") != got.get("fixture"):
        found.append("hint: the fixture checkpoint (the export's input) differs: phi3_export/fixtures or what it uses changed; "
                     "the export differences may all follow from it")
    for path, section, hint in _HINTS:
        if want["files"].get(path) != got["files"].get(path) and want.get(section) == got.get(section):
            found.append(f"hint: {hint}")
    now = library_versions()
    bumped = [f"{k} {recorded_versions.get(k)} -> {now[k]}" for k in now if recorded_versions.get(k) != now[k]]
    if bumped:
        found.append(f"note: library versions differ from those the golden file was recorded with: {', '.join(bumped)}")
    against = against or str(GOLDEN.relative_to(GOLDEN.parents[2]))
    return [f"{case}: the export differs from {against}"] + [f"  {line}" for line in found]


# ---- the test --------------------------------------------------------------------------------------------------------
@cache
def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_file_covers_the_cases():
    golden = _golden()
    assert sorted(golden["cases"]) == sorted(RECIPES), "tests/golden/phi3.json is for other recipes: regenerate it (see the docstring)"
    assert golden["export"] == json.loads(json.dumps(EXPORT)), "tests/golden/phi3.json was recorded with other export arguments"


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_matches_golden(recipe, fixture_dir, exported):
    golden = _golden()
    got = export_digest(fixture_dir(recipe), exported(recipe, **EXPORT))
    problems = report(recipe, golden["cases"][recipe], got, golden["generated_with"])
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# ---- the generator ---------------------------------------------------------------------------------------------------
def generate(workdir: Path) -> dict:
    """Build each recipe's fixture and export it under ``workdir``; the digests, keyed by recipe."""
    from phi3_export.api import quantize
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes import load_recipe

    cases = {}
    for recipe in RECIPES:
        fixture, out = workdir / f"fx-{recipe}", workdir / f"out-{recipe}" / "out"
        make_fixture(load_recipe(recipe), fixture)
        out.parent.mkdir(parents=True)
        quantize(fixture, out, **EXPORT)
        cases[recipe] = export_digest(fixture, out)
        print(f"  {recipe}: {len(cases[recipe]['files'])} files", file=sys.stderr)
    return cases


def _source_commit() -> str:
    import phi3_export

    root = Path(phi3_export.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "phi3_export", "recipes", "pyproject.toml"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"export twice, compare, write {GOLDEN}")
    parser.add_argument("--digest-to", type=Path, help="export once into a temp folder and write the digests here (used by --write)")
    args = parser.parse_args(argv)
    import phi3_export

    print(f"phi3_export from {Path(phi3_export.__file__).resolve().parent}", file=sys.stderr)
    if args.digest_to:
        with tempfile.TemporaryDirectory(prefix="phi3-golden-") as tmp:
            args.digest_to.write_text(json.dumps(generate(Path(tmp)), indent=1, sort_keys=True))
        return 0
    if not args.write:
        parser.error("nothing to do: pass --write")
    runs = []
    with tempfile.TemporaryDirectory(prefix="phi3-golden-runs-") as tmp:
        for seed in ("1", "2"):  # separate processes: a dict/set order that depends on the hash seed shows up
            path = Path(tmp) / f"run{seed}.json"
            print(f"run {seed}:", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--digest-to", str(path)], check=True, env={**os.environ, "PYTHONHASHSEED": seed})
            runs.append(json.loads(path.read_text()))
    unstable = [line for case in RECIPES for line in report(case, runs[0][case], runs[1][case], library_versions(), "the first run")]
    if unstable:
        print("the two exports differ, so nothing was written (the export is not deterministic):\n" + "\n".join(unstable), file=sys.stderr)
        return 1
    golden = {
        "about": "Digests of the Phi-3 family's int4 exports; see tests/test_golden.py. Regenerate only for an intended export change.",
        "export": EXPORT,
        "fixture_builder": "phi3_export.fixtures.tiny.make_fixture(load_recipe(recipe), out) defaults: 2 layers, default hidden, train_steps=0, seed=0",
        "generated_from": _source_commit(),
        "generated_with": library_versions(),
        "cases": runs[0],
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size // 1024} KiB); both runs agree", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
