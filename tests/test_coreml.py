"""Core ML export: the saved ML program computes the model, holds the ONNX artifact's codes, is deterministic."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, unpack_codes
from phi3_export.validate.coreml_program import CoreMLDecoder, MilProgram

PACKAGE = "coreml/model.mlpackage"


def _reference(fixture, q: QuantizedCheckpoint, ids: list[int]) -> np.ndarray:
    """transformers on the weights the program holds: our codes with float16 scales, float tensors in float16."""
    model = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name in q.tensors:
            if q.is_quantized(name):
                t = q.quantized(name)
                t.scales = t.scales.half().float()
                state[name].copy_(t.dequantize())
            else:
                state[name].copy_(q.float(name).half().float())
        return model(torch.tensor([ids])).logits[0].numpy()


# (recipe, fixture kwargs, export kwargs, tokens): MHA + sliding window past 2047, GQA, LongRoPE
# past the original 4096 (context raised with max_length), partial rotary + tied int4 table.
CASES = [
    ("phi-3-mini-4k", {}, {"max_length": 2100}, 2080),
    ("phi-3-medium-4k", {}, {}, 48),
    ("phi-3-mini-128k", {}, {"max_length": 4300}, 4160),
    ("phi-4-mini", {}, {"lm_head": "int4"}, 48),
]


@pytest.mark.parametrize("recipe,fixture_kwargs,export_kwargs,n", CASES)
def test_program_matches_transformers_with_cached_decode(recipe, fixture_kwargs, export_kwargs, n, fixture_dir, exported):
    out = exported(recipe, fixture_kwargs=fixture_kwargs, bits=4, formats=("coreml",), keep_quantized=True, **export_kwargs)
    q = QuantizedCheckpoint(out / "quantized")
    ids = np.random.RandomState(3).randint(0, q.config["vocab_size"], n).tolist()
    ref = _reference(fixture_dir(recipe, **fixture_kwargs), q, ids)
    # Relative to the largest logit; measured: fp32 reading <=3.6e-4, fp16 <=9.1e-4 (phi-4-mini), 5e-4 to 8e-4 otherwise.
    for precision, tolerance in (("fp32", 5e-4), ("fp16", 1.5e-3)):
        decoder = CoreMLDecoder(out / PACKAGE, precision)
        prefill = n - 8
        got = [decoder(ids[:prefill]), decoder(ids[prefill : prefill + 4])] + [decoder([t]) for t in ids[prefill + 4 :]]
        got = np.concatenate(got)
        assert decoder.length == n
        err = np.abs(got - ref).max()
        assert err < tolerance * max(1.0, np.abs(ref).max()), (precision, err)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * err  # positions whose greedy token no rounding can flip
        assert clear.any() and np.array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_fp16_program_error_is_fp16_sized(fixture_dir, exported):
    """Sanity of the reader: the fp16 run differs from the fp32 run, by about fp16's rounding."""
    out = exported("phi-3-mini-4k", bits=4, formats=("coreml",))
    ids = list(range(5, 45))
    a, b = CoreMLDecoder(out / PACKAGE, "fp32")(ids), CoreMLDecoder(out / PACKAGE, "fp16")(ids)
    assert 1e-5 < np.abs(a - b).max() < 1e-2


def _onnx_codes(artifact):
    model = onnx.load(str(artifact / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k = attrs["N"], attrs["K"]
        scales = inits[node.input[2]]
        codes = unpack_codes(torch.from_numpy(inits[node.input[1]].reshape(n, -1).copy()), 4, k).numpy()
        zeros = (unpack_codes(torch.from_numpy(inits[node.input[3]].copy()), 4, scales.shape[1]).numpy()
                 if len(node.input) > 3 else np.full(scales.shape, 8, np.uint8))
        # /model/layers.0/attn/qkv_proj/MatMulNBits -> layers_0_qkv_proj
        path = node.name.removesuffix("/MatMulNBits").strip("/").removeprefix("model/")
        key = path.replace("layers.", "layers_").replace("/attn/", "_").replace("/mlp/", "_")
        found[key] = (codes, zeros, scales)
    return found


def _coreml_weights(package):
    program = MilProgram(package)
    found = {}
    for op in program.block.operations:
        if op.type != "constexpr_blockwise_shift_scale":
            continue
        consts = program.constant_inputs(op)
        data, scale, offset = (consts[k] for k in ("data", "scale", "offset"))
        found[op.outputs[0].name.removesuffix("_weight")] = (data, offset, scale)
    return found


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_int4_weights_are_the_onnx_artifacts_codes(method, exported):
    kwargs = {"calib_samples": 4, "calib_seqlen": 32} if method == "awq" else {}
    out = exported("phi-3-medium-4k", bits=4, method=method, formats=("onnx", "coreml"), targets=("cpu",), symmetric=False, **kwargs)
    onnx_w, coreml_w = _onnx_codes(out / "onnx-cpu"), _coreml_weights(out / PACKAGE)
    assert set(onnx_w) == set(coreml_w) and len(onnx_w) == 4 * 2 + 1  # 4 linears x 2 layers + LM head
    for key, (codes, zeros, scales) in onnx_w.items():
        data, offset, scale = coreml_w[key]
        assert np.array_equal(data, codes), key  # bit-identical codes
        assert np.array_equal(offset, zeros), key  # and zero points
        assert np.array_equal(scale, scales.astype(np.float16)), key  # scales: float32 -> float16


def test_package_reloads_with_io_and_states(exported):
    import coremltools as ct

    out = exported("phi-3-medium-4k", bits=4, formats=("coreml",))
    model = ct.models.MLModel(str(out / PACKAGE), skip_model_load=True)
    spec = model.get_spec()
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: states and int4 blockwise
    desc = spec.description
    inputs = {i.name: i for i in desc.input}
    assert set(inputs) == {"inputIds", "causalMask"} and [o.name for o in desc.output] == ["logits"]
    ids_range = inputs["inputIds"].type.multiArrayType.shapeRange.sizeRanges
    assert (ids_range[1].lowerBound, ids_range[1].upperBound) == (1, 2048)  # the recipe's mobile default
    config = json.loads((out / "coreml" / "config.json").read_text())
    states = {s.name: tuple(s.type.stateType.arrayType.shape) for s in desc.state}
    shape = (config["num_hidden_layers"], 1, config["num_key_value_heads"], 2048,
             config["hidden_size"] // config["num_attention_heads"])
    assert states == {"keyCache": shape, "valueCache": shape}
    meta = desc.metadata.userDefined
    assert meta["co.huggingface.exporters.name"] == "phi-3-medium-4k" and meta["phi3_export.context_length"] == "2048"
    assert "com.github.apple.coremltools.conversion_date" not in meta
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "coreml_config.json"):
        assert (out / "coreml" / name).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["format"] == "coreml")
    assert artifact["context_length"] == 2048 and artifact["minimum_os"]["iOS"] == "18.0"


def test_two_exports_are_byte_identical(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    digests = []
    for k in (0, 1):
        manifest = quantize(fixture_dir("phi-4-mini"), tmp_path / f"out{k}", bits=4, formats=("coreml",))
        digests.append({f["path"]: f["sha256"] for a in manifest["artifacts"] for f in a["files"]})
    assert digests[0] == digests[1] and any(p.endswith("weight.bin") for p in digests[0])
    assert any(p.endswith("Manifest.json") for p in digests[0])


def test_coreml_export_memory_flat_in_layer_count(peaks_by_depth, tmp_path):
    peaks = peaks_by_depth(tmp_path, "--bits", "4", "--format", "coreml")
    shallow, deep = sorted(peaks)  # the depths of conftest.WIDE
    assert peaks[deep] <= 1.3 * peaks[shallow], peaks


def test_coreml_bits_32_is_refused(fixture_dir, tmp_path):
    from phi3_export.api import quantize
    from phi3_export.errors import Phi3ExportError

    with pytest.raises(Phi3ExportError, match="--format coreml: --bits 32"):
        quantize(fixture_dir("phi-3-mini-4k"), tmp_path / "out", bits=32, formats=("coreml",))
    assert not (tmp_path / "out").exists()



def test_validate_reports_program_accuracy_and_prediction_not_run(fixture_dir, exported, tmp_path):
    from phi3_export.progress import Progress
    from phi3_export.validate.run import ValidateOptions, failed_checks, validate_artifacts

    fixture = fixture_dir("phi-3-mini-4k", train_steps=150)
    out = exported("phi-3-mini-4k", fixture_kwargs={"train_steps": 150}, bits=4, formats=("onnx", "coreml"), targets=("cpu",))
    result = validate_artifacts(out, fixture, ValidateOptions(window=128, speed=False, chat_prompts=("Hi",),
                                                              cache_dir=tmp_path / "cache"), Progress(enabled=False))
    records = {(r["format"], r["provider"]): r for r in result["records"]}
    program, device, onnx_cpu = records[("coreml", "mil-reader")], records[("coreml", "coreml")], records[("onnx", "cpu")]
    assert not failed_checks(result)
    assert {c["name"] for c in program["checks"]} >= {"coreml_io", "coreml_kv_states", "coreml_linear_weights_blockwise"}
    assert program["status"] == "ok" and 0 < program["accuracy"]["kld_mean"] < 0.05
    # Same codes as the ONNX artifact: the two accuracies agree closely (fp16 vs fp32 activations apart).
    assert abs(program["accuracy"]["kld_mean"] - onnx_cpu["accuracy"]["kld_mean"]) < 0.2 * onnx_cpu["accuracy"]["kld_mean"]
    assert device["status"] == "not run" and "macOS 15" in device["reason"] and "accuracy" not in device


def test_prefill_decode_functions_are_refused_not_ignored(fixture_dir, tmp_path):
    from phi3_export.api import quantize
    from phi3_export.errors import Phi3ExportError

    recipe = tmp_path / "phi-3-mini-4k.yaml"
    text = (Path(__file__).resolve().parents[1] / "recipes" / "phi-3-mini-4k.yaml").read_text().replace("  target_options:", "  coreml:\n    functions: prefill-decode\n  target_options:")
    recipe.write_text(text)
    with pytest.raises(Phi3ExportError, match="prefill-decode.*not supported yet"):
        quantize(fixture_dir("phi-3-mini-4k"), tmp_path / "out", recipe=str(recipe), bits=4, formats=("coreml",))
    assert not (tmp_path / "out").exists()


def test_structure_check_accepts_a_tied_int8_lm_head_and_flags_a_float_linear(exported):
    from phi3_export.manifest import find_artifacts
    from phi3_export.validate.coreml import structural_checks

    out = exported("phi-4-mini", bits=4, formats=("coreml",), lm_head="int8")
    artifact = find_artifacts(out)[0]
    program = MilProgram(out / PACKAGE)
    checks, facts = structural_checks(program, artifact.entry, artifact.manifest["settings"], artifact.folder)
    check = next(c for c in checks if c["name"] == "coreml_linear_weights_blockwise")
    assert check["passed"], check
    assert facts["linear_weight_bits"] == {4: 8, 8: 1}  # 4 linears x 2 layers int4, the tied LM head int8
    settings = {**artifact.manifest["settings"], "overrides": {}}  # without the override, the int8 head is a finding
    checks, _ = structural_checks(program, artifact.entry, settings, artifact.folder)
    assert not next(c for c in checks if c["name"] == "coreml_linear_weights_blockwise")["passed"]
