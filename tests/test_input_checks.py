"""Input checks (issue 16): every malformed input is refused before anything is written.

Each refusal is checked end to end through the command line (`python -m phi3_export quantize`):
exit status 2, exactly one stderr line `error: ...` naming the file or flag, no traceback,
nothing at --out, no staging (`.OUT.partial-*`) or lock left beside it, and the input folder
byte-for-byte unchanged. The subprocess cases of a test run two at a time; the long tail of
config values and safetensors headers is checked in-process against the same functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phi3_export.checkpoint import Checkpoint
from phi3_export.checkpoint.check import physical_memory
from phi3_export.checkpoint.config import check_config
from phi3_export.checkpoint.reader import _tensor_index
from phi3_export.errors import Phi3ExportError

DOWN = "model.layers.1.mlp.down_proj.weight"
QKV0 = "model.layers.0.self_attn.qkv_proj.weight"
GiB = 1 << 30


# ---- breaking a copy of the tiny checkpoint ---------------------------------------------------

def _edit_config(**changes) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return build


_DELETE = object()


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: object, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_header(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        header, body = _header(folder / "model.safetensors")
        edit(header)
        _write_header(folder / "model.safetensors", header, body)
    return build


def _edit_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[name] = change(tensors[name].clone())
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return build


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[t.numel() // 2] = value
        return t
    return change


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _index(edit: Callable[[Path, dict], None]) -> Callable[[Path], None]:
    """An index.json for the single shard, then ``edit(folder, weight_map)``."""
    def build(folder: Path) -> None:
        header, _ = _header(folder / "model.safetensors")
        weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
        edit(folder, weight_map)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return build


def _shard_linked_outside(folder: Path, weight_map: dict) -> None:
    shutil.move(folder / "model.safetensors", folder.parent / "elsewhere.safetensors")
    os.symlink(folder.parent / "elsewhere.safetensors", folder / "model.safetensors")


def _linked_outside(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        shutil.move(folder / name, folder.parent / f"outside-{name}")
        os.symlink(folder.parent / f"outside-{name}", folder / name)
    return build


# ---- running the CLI and checking the contract ----------------------------------------------

@dataclass
class Case:
    id: str
    build: Callable[[Path], None] | None = None
    args: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # what the one error line must name (file, flag, key, tensor)
    out: str = "outs/out"  # relative to the case folder; "ckpt" is the checkpoint itself
    extra_files: dict[str, bytes] = field(default_factory=dict)  # beside the checkpoint (e.g. a --calib-text)
    # Run as a real process (`python -m phi3_export`, ~2 s of imports each): at least one case per
    # check; the others go through the same click group in-process (CliRunner), which is where the
    # exit status and the `error: ` line are made.
    process: bool = False


@dataclass
class Outcome:
    returncode: int
    stderr: str


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _refused(cases: list[Case], fixture: Path, tmp_path: Path) -> None:
    """Run every case's `quantize` (two at a time) and check the error contract for each."""
    prepared = []
    for case in cases:
        work = tmp_path / case.id
        ckpt = work / "ckpt"
        shutil.copytree(fixture, ckpt)
        if case.build:
            case.build(ckpt)
        for name, data in case.extra_files.items():
            (work / name).write_bytes(data)
        (work / "outs").mkdir()
        out = work / case.out
        args = [str(work / a[1:]) if a.startswith("@") else a for a in case.args]
        # The input as the run sees it: everything under the case folder but the outputs' parent.
        before = {**_digest(ckpt), **{n: hashlib.sha256((work / n).read_bytes()).hexdigest() for n in case.extra_files}}
        cmd = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out), "--quiet", *args]
        prepared.append((case, work, ckpt, out, before, cmd))

    def run(item) -> Outcome:
        proc = subprocess.run(item[-1], capture_output=True, text=True, check=False, timeout=300)
        return Outcome(proc.returncode, proc.stderr)

    with ThreadPoolExecutor(2) as pool:
        processes = pool.map(run, [item for item in prepared if item[0].process])
        # Meanwhile, in this process: the same click group the console script runs.
        inline = {item[0].id: _invoke(item[-1][3:]) for item in prepared if not item[0].process}
        results = [next(processes) if item[0].process else inline[item[0].id] for item in prepared]
    for (case, work, ckpt, out, before, _), proc in zip(prepared, results):
        lines = proc.stderr.strip().splitlines()
        where = f"[{case.id}] rc={proc.returncode} stderr={proc.stderr!r}"
        assert proc.returncode == 2, where
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert "Traceback" not in proc.stderr, where
        for name in case.names:
            assert name in lines[0], f"{where}: should name {name!r}"
        if case.out != "ckpt" and out != work:
            assert not out.exists(), where
        assert not list(out.parent.glob(f".{out.name}.partial-*")), where
        assert not (out.parent / f".{out.name}.lock").exists(), where
        if case.out == "outs/out":  # nothing beside --out either: no staging, lock or AWQ work folder
            assert list((work / "outs").iterdir()) == [], where
        after = {**_digest(ckpt), **{n: hashlib.sha256((work / n).read_bytes()).hexdigest() for n in case.extra_files}}
        assert after == before, f"{where}: the input changed"


def _invoke(args: list[str]) -> Outcome:
    from click.testing import CliRunner

    from phi3_export.cli import main

    result = CliRunner().invoke(main, args)
    return Outcome(result.exit_code, result.stderr + (repr(result.exception) if result.exit_code not in (0, 2) else ""))


@pytest.fixture(scope="module")
def tiny(fixture_dir) -> Path:
    return fixture_dir("phi-3-mini-4k")


# ---- 1. checkpoint checks before writing: dtypes, config ranges, memory --------------------

def test_checkpoint_checked_before_anything_is_written(tiny, tmp_path):
    cases = [
        Case("int8-linear", _edit_tensor(DOWN, lambda t: t.to(torch.int8)), names=("model.safetensors", DOWN, "I8"), process=True),
        Case("hidden-string", _edit_config(hidden_size="64"), names=("config.json", "hidden_size")),
        Case("hidden-1e12", _edit_config(hidden_size=1e12), names=("config.json", "hidden_size")),
        Case("heads-zero", _edit_config(num_attention_heads=0), names=("config.json", "num_attention_heads")),
        Case("kv-heads-not-dividing", _edit_config(num_key_value_heads=3), names=("config.json", "num_key_value_heads")),
        Case("rope-scaling-list", _edit_config(rope_scaling=[1.0]), names=("config.json", "rope_scaling")),
        Case("no-hidden-size", _edit_config(hidden_size=_DELETE), names=("config.json", "hidden_size")),
    ]
    if physical_memory() < 800 * GiB:
        # Valid integers within every bound, but one such layer is ~900 GiB: refused from config.json alone.
        cases.append(Case("layer-beyond-memory", _edit_config(hidden_size=1 << 17, intermediate_size=1 << 20,
                                                              num_attention_heads=1024, num_key_value_heads=1024),
                          names=("config.json", "memory", "one decoder layer")))
    if physical_memory() < 100 * GiB:
        # A context config.json allows, asked for whole: ~137 GiB of RoPE tables, refused naming the flag.
        cases.append(Case("max-length-beyond-memory",
                          _edit_config(phi3_export_fixture=_DELETE, max_position_embeddings=1 << 22,
                                       original_max_position_embeddings=1 << 22, head_dim=4096),
                          args=("--max-length", str(1 << 22)), names=("--max-length 4194304", "memory")))
    _refused(cases, tiny, tmp_path)


BAD_CONFIGS = [
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_size": 64.0}, "hidden_size"),
    ({"hidden_size": True}, "hidden_size"),
    ({"hidden_size": 10**12}, "hidden_size"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": (1 << 21) + 1}, "vocab_size"),
    ({"max_position_embeddings": (1 << 22) + 1}, "max_position_embeddings"),
    ({"num_hidden_layers": 1025}, "num_hidden_layers"),
    ({"num_hidden_layers": [2]}, "num_hidden_layers"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"architectures": "Phi3ForCausalLM"}, "architectures"),
    ({"architectures": []}, "architectures"),
    ({"architectures": [None]}, "architectures"),
    ({"rope_parameters": "default"}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "short_factor"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 3}}, "long_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}, "rope_theta"),
    ({"rope_parameters": None, "partial_rotary_factor": 2.0}, "partial_rotary_factor"),
    ({"rope_parameters": None, "partial_rotary_factor": 0.01}, "partial_rotary_factor"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"sliding_window": "none"}, "sliding_window"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id"),
    ({"model_type": 3}, "model_type"),
]


@pytest.mark.parametrize("changes,key", BAD_CONFIGS, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_CONFIGS)])
def test_config_values_range_checked_in_one_place(tiny, changes, key):
    config = {**json.loads((tiny / "config.json").read_text()), **changes}
    with pytest.raises(Phi3ExportError) as err:
        check_config(config, "ckpt/config.json")
    message = str(err.value)
    assert message.startswith("ckpt/config.json: ") and key in message and "\n" not in message


def test_config_not_an_object_and_moe_keys():
    with pytest.raises(Phi3ExportError, match="must be a JSON object"):
        check_config([1], "config.json")
    from phi3_export.arch.phimoe import PhiMoE
    from phi3_export.fixtures.full_size import full_size_config
    from phi3_export.recipes import load_recipe

    moe = full_size_config(load_recipe("phi-3.5-moe"), layers=2)
    rules = {"required": PhiMoE.config_required, "fixed": PhiMoE.config_fixed}
    check_config(moe, "config.json", **rules)
    for changes, key in (({"num_local_experts": None}, "num_local_experts"), ({"num_local_experts": 257}, "num_local_experts"),
                         ({"num_experts_per_tok": 3}, "num_experts_per_tok"),
                         ({"num_experts_per_tok": 17}, "num_experts_per_tok")):
        with pytest.raises(Phi3ExportError, match=f"config.json: {key}"):
            check_config({**moe, **changes}, "config.json", **rules)


def test_published_dimensions_pass_and_fit_a_16_gib_machine():
    """No false refusals: every supported recipe's full-size config passes, and its RTN export's estimated
    peak (what a 16 GiB laptop must hold) stays under 4 GiB."""
    from phi3_export.arch import known_architectures
    from phi3_export.checkpoint.check import peak_memory_terms
    from phi3_export.fixtures.full_size import full_size_config
    from phi3_export.recipes import list_recipes, load_recipe

    for name in list_recipes():
        recipe = load_recipe(name)
        arch = known_architectures()[recipe.model.architecture]
        if not arch.supported:
            continue
        config = full_size_config(recipe)
        check_config(config, f"{name}/config.json", required=getattr(arch, "config_required", ()),
                     fixed=getattr(arch, "config_fixed", None))
        assert sum(peak_memory_terms(config, max_length=recipe.export.max_length).values()) < 4 * GiB, name


# ---- 2. NaN / Inf caught as tensors stream through ------------------------------------------

def test_nan_or_inf_named_as_tensors_stream(tiny, tmp_path):
    nan, inf = _poison(float("nan")), _poison(float("inf"))
    _refused([
        Case("nan-linear-rtn", _edit_tensor(DOWN, nan), names=(f"{DOWN}: contains NaN or Inf",)),
        Case("inf-float-norm", _edit_tensor("model.layers.0.input_layernorm.weight", inf),
             names=("model.layers.0.input_layernorm.weight: contains NaN or Inf",)),
        Case("nan-embedding", _edit_tensor("model.embed_tokens.weight", nan), names=("model.embed_tokens.weight: contains NaN",)),
        # AWQ stores the weights it has scaled; the first layer's attention is stored first.
        Case("nan-linear-awq", _edit_tensor(QKV0, nan), names=(f"{QKV0}: contains NaN or Inf",),
             args=("--method", "awq", "--calib-samples", "2", "--calib-seqlen", "16"), process=True),
    ], tiny, tmp_path)


# ---- 3. flags bounded -------------------------------------------------------------------------

def test_flags_bounded(tiny, tmp_path):
    _refused([
        Case("max-length-0", args=("--max-length", "0"), names=("--max-length 0",), process=True),
        Case("max-length-negative", args=("--max-length", "-5"), names=("--max-length -5",)),
        Case("max-length-0-coreml", args=("--max-length", "0", "--format", "coreml"), names=("--max-length 0",)),
        Case("max-length-beyond-context", args=("--max-length", "1000000000"), names=("--max-length 1000000000", "context")),
        Case("calib-seqlen-1", args=("--method", "awq", "--calib-seqlen", "1"), names=("--calib-seqlen 1",)),
        Case("calib-samples-0", args=("--method", "awq", "--calib-samples", "0"), names=("--calib-samples 0",)),
        Case("calib-text-not-utf8", args=("--method", "awq", "--calib-text", "@calib.txt"), names=("calib.txt", "UTF-8"),
             extra_files={"calib.txt": b"\xff\xfe\x00" * 64}),
        Case("calib-text-empty", args=("--method", "awq", "--calib-text", "@calib.txt"), names=("calib.txt", "--calib-text"),
             extra_files={"calib.txt": b" \n"}),
        Case("calib-text-too-short", args=("--method", "awq", "--calib-text", "@calib.txt", "--calib-seqlen", "64"),
             names=("--calib-text", "--calib-seqlen 64"), extra_files={"calib.txt": b"a few words"}),
    ], tiny, tmp_path)


# ---- 4. paths stay inside the checkpoint folder ----------------------------------------------

def test_paths_leaving_the_checkpoint_refused(tiny, tmp_path):
    def entry(value: str) -> Callable[[Path, dict], None]:
        return lambda folder, weight_map: weight_map.__setitem__(DOWN, value.replace("FOLDER", str(folder)))

    index = "model.safetensors.index.json"
    _refused([
        Case("index-dotdot", _index(entry("../ckpt/model.safetensors")), names=(index, DOWN, "../ckpt/model.safetensors"), process=True),
        Case("index-absolute", _index(entry("FOLDER/model.safetensors")), names=(index, DOWN)),
        Case("index-symlink-outside", _index(_shard_linked_outside), names=(index, "model.safetensors", "outside")),
        Case("tokenizer-symlink-outside", _linked_outside("tokenizer.json"), names=("tokenizer.json", "outside")),
        Case("license-symlink-outside", _linked_outside("LICENSE"), names=("LICENSE", "outside")),
    ], tiny, tmp_path)


def test_hugging_face_cache_snapshot_links_are_inside(tiny, tmp_path):
    """A hub cache snapshot links every file to ../../blobs: that is the checkpoint's own storage."""
    blobs, snapshot = tmp_path / "models--x" / "blobs", tmp_path / "models--x" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in tiny.iterdir():
        blob = blobs / hashlib.sha256(path.name.encode()).hexdigest()
        shutil.copy(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    assert DOWN in Checkpoint(snapshot).names
    os.symlink(tmp_path / "stray", snapshot / "LICENSE.md")
    (tmp_path / "stray").write_text("not the model's")
    with pytest.raises(Phi3ExportError, match="LICENSE.md: it resolves to .*outside the checkpoint folder"):
        Checkpoint(snapshot)


# ---- 5. malformed inputs: one line, never a traceback ----------------------------------------

def test_malformed_inputs_are_one_line_errors(tiny, tmp_path):
    _refused([
        Case("config-array", _write("config.json", "[1, 2]"), names=("config.json", "array"), process=True),
        Case("architectures-string", _edit_config(architectures="Phi3ForCausalLM"), names=("config.json", "architectures")),
        Case("architectures-empty", _edit_config(architectures=[]), names=("config.json", "architectures")),
        Case("tokenizer-config-invalid", _write("tokenizer_config.json", "{nope"), names=("tokenizer_config.json", "invalid JSON")),
        Case("tokenizer-config-template-number", _write("tokenizer_config.json", '{"chat_template": 5}'),
             names=("tokenizer_config.json", "chat_template")),
        Case("tokenizer-json-array", _write("tokenizer.json", "[]"), names=("tokenizer.json",)),
        Case("header-entry-array", _edit_header(lambda h: h.__setitem__(DOWN, [1])), names=("model.safetensors", DOWN)),
        Case("header-no-dtype", _edit_header(lambda h: h[DOWN].pop("dtype")), names=("model.safetensors", DOWN, "dtype")),
        Case("header-offsets-reversed", _edit_header(lambda h: h[DOWN].__setitem__("data_offsets", h[DOWN]["data_offsets"][::-1])),
             names=("model.safetensors", DOWN, "data_offsets")),
        Case("header-shape-vs-bytes", _edit_header(lambda h: h[DOWN].__setitem__("shape", [h[DOWN]["shape"][0], 1 + h[DOWN]["shape"][1]])),
             names=("model.safetensors", DOWN, "bytes")),
        Case("header-unknown-dtype", _edit_header(lambda h: h[DOWN].__setitem__("dtype", "F7")), names=("model.safetensors", "'F7'")),
        Case("index-weight-map-list", _write("model.safetensors.index.json", '{"weight_map": ["model.safetensors"]}'),
             names=("model.safetensors.index.json", "weight_map")),
    ], tiny, tmp_path)


def _tensor(dtype: str = "F32", shape=(2, 2), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = [
    ([1, 2], "not an object"),
    ({"a": [1]}, "must be an object"),
    ({"a": {"shape": [2, 2], "data_offsets": [0, 16]}}, "no 'dtype'"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 16]}}, "no 'shape'"),
    ({"a": {"dtype": "F32", "shape": [2, 2]}}, "no 'data_offsets'"),
    ({"a": _tensor(offsets=(16, 0))}, "end before they begin"),
    ({"a": _tensor(offsets=(-16, 0))}, "non-negative"),
    ({"a": _tensor(offsets=(0, 16.0))}, "non-negative integers"),
    ({"a": _tensor(shape=(2, 3))}, "24 bytes"),
    ({"a": _tensor(shape=(-2, -2))}, "non-negative"),
    ({"a": _tensor(shape=(2.0, 2))}, "non-negative"),
    ({"a": _tensor(dtype="F7")}, "unsupported dtype 'F7'"),
    ({"a": _tensor(dtype=32)}, "unsupported dtype"),
    ({"a": _tensor(offsets=(0, 16)), "b": _tensor(offsets=(0, 16))}, "overlaps"),
    ({"a": _tensor(offsets=(16, 32))}, "gap"),
    ({"a": _tensor(shape=(2, 4), offsets=(0, 32))}, "truncated"),
    ({"a": _tensor(shape=(1, 2), offsets=(0, 8))}, "after the last tensor"),
    ({"__metadata__": {"format": 1}, "a": _tensor()}, "__metadata__"),
]


@pytest.mark.parametrize("header,problem", BAD_HEADERS, ids=[str(i) for i in range(len(BAD_HEADERS))])
def test_safetensors_header_checked_as_safetensors_will(tmp_path, header, problem):
    path = tmp_path / "model.safetensors"
    _write_header(path, header, b"\0" * 16)
    with pytest.raises(Phi3ExportError) as err:
        _tensor_index(path)
    assert str(err.value).startswith(str(path)) and problem in str(err.value) and "\n" not in str(err.value)


def test_tensor_index_never_tracebacks_on_mangled_files(tiny, tmp_path):
    """Seeded mutations of a real shard (a light cousin of the hypothesis fuzzing): a header it accepts
    opens in safetensors, anything else is a Phi3ExportError."""
    from safetensors import safe_open

    real = (tiny / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", real[:8])
    rng = random.Random(16)
    path = tmp_path / "m.safetensors"
    for i in range(300):
        data = bytearray(real[: 8 + n + 4096]) if i % 3 == 0 else bytearray(real)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(8 + n) if i % 2 else rng.randrange(8)] = rng.randrange(256)
        path.write_bytes(bytes(data[: rng.randrange(len(data))] if i % 7 == 0 else data))
        try:
            _tensor_index(path)
        except Phi3ExportError as exc:
            assert "\n" not in str(exc)
            continue
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()) is not None
    for raw in (b"[" * 100_000, b'{"a": 1' + b"0" * 5000 + b"}", b"\xff\xfe{}", b"", b"null"):
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(Phi3ExportError):
            _tensor_index(path)


# ---- 6. --out never overlaps the checkpoint -------------------------------------------------

def test_out_overlapping_the_checkpoint_refused(tiny, tmp_path):
    _refused([
        # The tiny checkpoint is phi3-export's own (a fixture): --force alone would have replaced it.
        Case("out-is-checkpoint", args=("--force",), out="ckpt", names=("--out", "--checkpoint"), process=True),
        Case("out-inside-checkpoint", out="ckpt/sub", names=("--out", "--checkpoint")),
        Case("out-holds-checkpoint", out=".", names=("--out", "--checkpoint")),
    ], tiny, tmp_path)
