"""Core AI export: Apple's runtime (coreai-core, on Linux) computes the model from the asset,
which holds the ONNX artifact's int4 bytes once for both functions and is deterministic."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from phi3_export.quant.qcheckpoint import QuantizedCheckpoint

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ASSET = "coreai/model.aimodel"


@pytest.fixture(scope="session")
def coreai_recipe(shared_cache):
    """``coreai_recipe(name, **coreai_options)`` -> a shipped recipe with ``export.coreai`` set."""

    def build(name: str, **options) -> str:
        def write(folder: Path) -> None:
            text = (RECIPES / f"{name}.yaml").read_text()
            (folder / f"{name}.yaml").write_text(text.replace("export:\n", f"export:\n  coreai: {json.dumps(options)}\n", 1))

        return str(shared_cache(json.dumps(["coreai-recipe", name, options]), write) / f"{name}.yaml")

    return build


def _reference(fixture, q: QuantizedCheckpoint, ids: list[int], precision: str) -> np.ndarray:
    """transformers (fp32) on the weights the asset holds: W = (codes - zeros) * scales in float16,
    the op's own arithmetic; float tensors in the program's dtype."""
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name in q.tensors:
            if q.is_quantized(name):
                t = q.quantized(name)
                rows, cols = t.codes.shape
                blocks = (t.codes.view(rows, -1, t.block_size).half() - t.zeros.half()[..., None]) * t.scales.half()[..., None]
                state[name].copy_(blocks.reshape(rows, cols).float())
            else:
                value = q.float(name)
                state[name].copy_(value.half().float() if precision == "float16" else value)
        return model(torch.tensor([ids])).logits[0].numpy()


def _run(out: Path, ids: list[int], decode_steps: int = 3):
    from phi3_export.validate.coreai_runtime import CoreAIDecoder

    decoder = CoreAIDecoder(out / "coreai")
    try:
        prefill = len(ids) - decode_steps
        got = np.concatenate([decoder(ids[:prefill])] + [decoder([t]) for t in ids[prefill:]])
        assert decoder.length == len(ids)
        return got
    finally:
        decoder.close()


# (recipe, Core AI options, export kwargs, tokens): MHA with the sliding window passed (2047) in
# 64-token prefill chunks; LongRoPE past the original 4096 in one prefill call (the switch to the
# long factors is per call, as in any cached decoder: keys cached earlier keep the short ones,
# which a one-pass reference cannot show); partial rotary + a tied int4 table.
CASES = [
    ("phi-3-mini-4k", {}, {"max_length": 2100}, 2080),
    ("phi-3-mini-128k", {"prefill_chunk": 4160}, {"max_length": 4300}, 4160),
    ("phi-4-mini", {}, {"lm_head": "int4"}, 48),
]


@pytest.mark.parametrize("recipe,options,export_kwargs,n", CASES)
def test_runtime_matches_transformers_with_prefill_and_decode(recipe, options, export_kwargs, n, fixture_dir,
                                                              exported, coreai_recipe):
    fixture = fixture_dir(recipe)
    out = exported(recipe, recipe=coreai_recipe(recipe, precision="float32", **options), bits=4,
                   formats=("coreai",), keep_quantized=True, **export_kwargs)
    q = QuantizedCheckpoint(out / "quantized")
    ids = np.random.RandomState(3).randint(0, q.config["vocab_size"], n).tolist()
    got, ref = _run(out, ids), _reference(fixture, q, ids, "float32")
    err = np.abs(got - ref).max()
    # Measured: 2.4e-7 (mini-4k, 40 tokens). The bound: 1e-4.
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err


def test_float16_asset_error_is_float16_sized(fixture_dir, exported):
    """The shipped default (float16 program and cache): within 3e-3 of the largest logit.

    Measured 2.1e-3 on this fixture, where transformers itself in float16 is 4.6e-4 off: the
    runtime's float16 kernels round more than torch's CPU ones (which accumulate in float32),
    and more than our numpy reading of the Core ML program (1.5e-3 allowed there)."""
    fixture = fixture_dir("phi-3-mini-4k")
    out = exported("phi-3-mini-4k", bits=4, formats=("coreai",), keep_quantized=True, max_length=256)
    q = QuantizedCheckpoint(out / "quantized")
    ids = np.random.RandomState(5).randint(0, q.config["vocab_size"], 80).tolist()
    got, ref = _run(out, ids), _reference(fixture, q, ids, "float16")
    err = np.abs(got - ref).max()
    assert 1e-5 < err < 3e-3 * max(1.0, np.abs(ref).max()), err
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def _onnx_weights(artifact: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    model = onnx.load(str(artifact / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.name: (inits[node.input[1]], inits[node.input[2]]) for node in model.graph.node if node.op_type == "MatMulNBits"}


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_int4_bytes_are_the_onnx_artifacts_and_stored_once(method, exported, tmp_path):
    kwargs = {"calib_samples": 4, "calib_seqlen": 32} if method == "awq" else {}
    out = exported("phi-3-medium-4k", bits=4, method=method, formats=("onnx", "coreai"), targets=("cpu",), symmetric=False,
                   max_length=256, **kwargs)
    blob = (out / ASSET / "main.mlirb").read_bytes()
    weights = _onnx_weights(out / "onnx-cpu")
    assert len(weights) == 4 * 2 + 1  # 4 linears x 2 layers + LM head
    for name, (codes, scales) in weights.items():
        # MatMulNBits' B, byte for byte, once: prefill and decode share one constant.
        assert blob.count(codes.tobytes()) == 1, name
        assert blob.count(scales.astype(np.float16).tobytes()) == 1, name  # its scales, float32 -> float16
    # validate's own check of the same, and that it can fail: another run's ONNX codes are not in this asset.
    from phi3_export.manifest import find_artifacts
    from phi3_export.validate.coreai import onnx_codes_check

    coreai = next(a for a in find_artifacts(out) if a.entry["format"] == "coreai")
    assert onnx_codes_check(coreai)["passed"]
    other = exported("phi-3-medium-4k", bits=4, method="rtn" if method == "awq" else "awq", formats=("onnx",), targets=("cpu",),
                     symmetric=False, **({} if method == "awq" else {"calib_samples": 4, "calib_seqlen": 32}))
    mixed_out = tmp_path / "mixed"
    mixed_out.mkdir()
    shutil.copytree(out / "coreai", mixed_out / "coreai")
    shutil.copytree(other / "onnx-cpu", mixed_out / "onnx-cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["format"] == "coreai"] + [
        a for a in json.loads((other / "manifest.json").read_text())["artifacts"] if a["format"] == "onnx"]
    (mixed_out / "manifest.json").write_text(json.dumps(manifest))
    mixed = next(a for a in find_artifacts(mixed_out) if a.entry["format"] == "coreai")
    assert not onnx_codes_check(mixed)["passed"]


def test_two_exports_are_byte_identical(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    digests = []
    for k in (0, 1):
        manifest = quantize(fixture_dir("phi-4-mini"), tmp_path / f"out{k}", bits=4, formats=("coreai",), max_length=128)
        digests.append({f["path"]: f["sha256"] for a in manifest["artifacts"] for f in a["files"]})
    assert digests[0] == digests[1]
    assert {"coreai/model.aimodel/main.mlirb", "coreai/model.aimodel/metadata.json", "coreai/coreai_config.json"} <= set(digests[0])


def test_manifest_config_and_asset_describe_the_same_contract(exported):
    from phi3_export.export.coreai.contract import DECODE, KEY_CACHE, PREFILL
    from phi3_export.validate.coreai_runtime import CoreAIDecoder

    out = exported("phi-3-mini-4k", bits=4, formats=("coreai",), keep_quantized=True, max_length=256)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["format"] == "coreai")
    assert entry["minimum_os"] == {"iOS": "27.0", "macOS": "27.0"} and entry["context_length"] == 256
    config = json.loads((out / "coreai" / "coreai_config.json").read_text())
    model = json.loads((out / "coreai" / "config.json").read_text())
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    assert config["states"][KEY_CACHE]["shape"] == [model["num_hidden_layers"], 1, model["num_key_value_heads"], 256, head_dim]
    assert config["precision"] == "float16" and config["functions"][PREFILL]["inputs"]["inputIds"]["shape"] == [1, 64]
    assert (out / "coreai" / "LICENSE").is_file() and (out / "coreai" / "tokenizer.json").is_file()
    assert "creationDate" not in json.loads((out / ASSET / "metadata.json").read_text())
    decoder = CoreAIDecoder(out / "coreai")
    try:
        for name in (PREFILL, DECODE):
            desc = decoder.functions[name].desc
            assert list(desc.input_names) == ["inputIds", "position"] and list(desc.output_names) == ["logits"]
            assert sorted(desc.state_names) == ["keyCache", "valueCache"]
    finally:
        decoder.close()


def test_validate_runs_the_runtime_and_says_speed_was_not_run(fixture_dir, exported, tmp_path):
    from click.testing import CliRunner

    from phi3_export.cli import main
    from phi3_export.progress import Progress
    from phi3_export.validate.run import ValidateOptions, failed_checks, validate_artifacts

    fixture = fixture_dir("phi-3-mini-4k", train_steps=150)
    out = exported("phi-3-mini-4k", fixture_kwargs={"train_steps": 150}, bits=4, formats=("onnx", "coreai"), targets=("cpu",))
    result = validate_artifacts(out, fixture, ValidateOptions(window=128, speed=False, chat_prompts=("Hi",), coreai_windows=2,
                                                              cache_dir=tmp_path / "cache"), Progress(enabled=False))
    records = {(r["format"], r["provider"]): r for r in result["records"]}
    coreai, onnx_cpu = records[("coreai", "coreai")], records[("onnx", "cpu")]
    assert not failed_checks(result)
    assert {c["name"] for c in coreai["checks"]} >= {"coreai_loads", "coreai_functions", "coreai_kv_states",
                                                     "coreai_linear_weights_blockwise", "coreai_codes_match_onnx", "tokenizer_parity"}
    assert coreai["status"] == "ok" and coreai["accuracy"]["windows"] == 2 and 0 < coreai["accuracy"]["kld_mean"] < 0.05
    # Same codes as the ONNX artifact: close accuracies (float16 vs float32 activations apart).
    assert abs(coreai["accuracy"]["kld_mean"] - onnx_cpu["accuracy"]["kld_mean"]) < 0.3 * onnx_cpu["accuracy"]["kld_mean"]
    assert coreai["speed"]["status"] == "not run" and "Apple device" in coreai["speed"]["reason"]
    # The report reads these records (accuracy carries a "how" text beside its figures).
    (tmp_path / "validate.json").write_text(json.dumps(result))
    run = CliRunner().invoke(main, ["report", str(tmp_path / "validate.json"), "--out", str(tmp_path / "report")])
    assert run.exit_code == 0, run.output
    assert "coreai" in (tmp_path / "report" / "report.md").read_text()


def test_without_the_extra_the_error_says_how_to_install(fixture_dir, tmp_path, monkeypatch):
    from importlib import metadata

    from click.testing import CliRunner

    from phi3_export.cli import main

    real = metadata.version

    def missing(dist):
        if dist == "coreai-torch":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(metadata, "version", missing)
    result = CliRunner().invoke(main, ["quantize", "--checkpoint", str(fixture_dir("phi-3-mini-4k")), "--out",
                                       str(tmp_path / "out"), "--format", "coreai"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'phi3-export[coreai]'" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_mixture_of_experts_is_refused_before_quantizing(fixture_dir, tmp_path):
    from phi3_export.api import quantize
    from phi3_export.errors import Phi3ExportError

    with pytest.raises(Phi3ExportError, match="--format coreai: not available for .*Core AI"):
        quantize(fixture_dir("phi-3.5-moe"), tmp_path / "out", bits=4, formats=("coreai",))
    assert not (tmp_path / "out").exists()


def test_export_memory_grows_by_the_int4_bytes_not_the_weights(peaks_by_depth, tmp_path):
    """coreai-core holds the whole asset in memory until it is written (not flat in depth), so the
    bound is on the growth: at most the extra int4 bytes once more, far below the extra weights."""
    peaks = peaks_by_depth(tmp_path, "--bits", "4", "--format", "coreai", "--max-length", "256")
    shallow, deep = sorted(peaks)
    asset = {n: sum(p.stat().st_size for p in (tmp_path / f"out{n}-0" / ASSET).rglob("*")) / 2**20 for n in peaks}
    grown, asset_grown = peaks[deep] - peaks[shallow], asset[deep] - asset[shallow]
    # Measured: +177 MB of memory for +108 MB of asset (1.65x: the program's constants, plus
    # each layer's scales and zero points in torch until conversion); the bf16 weights grow by 380 MB.
    assert grown <= 2.0 * asset_grown, (peaks, asset)
