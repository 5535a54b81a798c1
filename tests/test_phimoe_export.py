"""Phi-3.5-MoE through the plan: ONNX parity with transformers, sparsemixer routing, our codes in QMoE,
onnxruntime-genai, determinism, bad inputs, streaming."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from test_phimoe_layer import with_long_factors
from transformers import AutoModelForCausalLM, AutoTokenizer

from phi3_export.memory import run_measured
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, unpack_codes
from phi3_export.validate.ort_decoder import OrtDecoder

RECIPE = "phi-3.5-moe"
TOL = 1e-4


def _reference(folder, ids: np.ndarray, routing=None) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # transformers 5.23 keeps LongRoPE's short factors past the original context for PhiMoE (its
    # rotary forward never reads the long ones); the published model switches: see test_phimoe_layer.
    with_long_factors(model)
    if routing is not None:
        import transformers.models.phimoe.modeling_phimoe as modeling

        original = modeling.sparsemixer
        modeling.sparsemixer = routing
    try:
        with torch.no_grad():
            return model(torch.tensor(ids)).logits.numpy()
    finally:
        if routing is not None:
            modeling.sparsemixer = original


def _compare(reference: np.ndarray, artifact, ids: np.ndarray, decode_steps: int = 3) -> float:
    decoder = OrtDecoder(artifact)
    prefill = ids.shape[1] - decode_steps
    logits, cache = decoder.step(ids[:, :prefill], decoder.empty_cache())
    worst = np.abs(logits - reference[:, :prefill]).max()
    for t in range(prefill, ids.shape[1]):
        logits, cache = decoder.step(ids[:, t : t + 1], cache)
        worst = max(worst, np.abs(logits[:, 0] - reference[:, t]).max())
    return float(worst)


def _ids(folder, length: int) -> np.ndarray:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return np.random.RandomState(0).randint(0, vocab, (1, length))


@pytest.mark.parametrize("length", [48, 4160])  # 4160 > 4096: long factors and the long mscale
def test_fp32_matches_transformers_prefill_decode_and_long_context(length, fixture_dir, exported):
    folder = fixture_dir(RECIPE)
    out = exported(RECIPE, bits=32, targets=("cpu",))
    ids = _ids(folder, length)
    assert _compare(_reference(folder, ids), out / "onnx-cpu", ids) <= TOL


def _softmax_top2(scores, jitter_eps, training, top_k=2):
    """Plain softmax top-2 (renormalised): what QMoE computes when it routes by itself."""
    probs = torch.softmax(scores, dim=-1)
    weights, experts = probs.topk(2, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def test_artifact_follows_sparsemixer_not_softmax_routing(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    # Sharpen the router so sparsemixer's weights differ clearly from softmax top-2's.
    folder = tmp_path / "sharp"
    shutil.copytree(fixture_dir(RECIPE), folder)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors.update({k: v * 40 for k, v in tensors.items() if k.endswith("block_sparse_moe.gate.weight")})
        save_file(tensors, shard, metadata={"format": "pt"})
    quantize(folder, tmp_path / "out", bits=32, targets=("cpu",))
    ids = _ids(folder, 40)
    sparsemixer = _compare(_reference(folder, ids), tmp_path / "out" / "onnx-cpu", ids)
    softmax = _compare(_reference(folder, ids, routing=_softmax_top2), tmp_path / "out" / "onnx-cpu", ids)
    assert sparsemixer <= TOL
    assert softmax > 100 * TOL, softmax  # the kernel's own routing would not have matched


def test_qmoe_holds_our_codes_and_the_router_stays_float(fixture_dir, exported):
    out = exported(RECIPE, bits=4, targets=("cpu",), keep_quantized=True, symmetric=False)
    q = QuantizedCheckpoint(out / "quantized")
    model = onnx.load(out / "onnx-cpu" / "model.onnx")
    init = {t.name: numpy_helper.to_array(t, base_dir=str(out / "onnx-cpu")) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QMoE" and n.name.startswith("/model/layers.1/"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits, block = attrs["expert_weight_bits"], attrs["block_size"]
    experts = q.config["num_local_experts"]
    for fc, parts in ((1, ("w1", "w3")), (2, ("w2",))):
        codes, scales, zp = (init[node.input[i]] for i in ((2, 3, 11) if fc == 1 else (5, 6, 12)))
        for e in range(experts):
            ours = [q.quantized(f"model.layers.1.block_sparse_moe.experts.{e}.{p}.weight") for p in parts]
            want = torch.stack([t.dequantize() for t in ours], dim=1).reshape(-1, ours[0].shape[1])  # rows interleaved
            rows = codes.shape[1]
            unpacked = unpack_codes(torch.from_numpy(codes[e]), bits, want.shape[1]).float().view(rows, -1, block)
            zeros = unpack_codes(torch.from_numpy(zp[e]), bits, unpacked.shape[1]).float()
            got = ((unpacked - zeros[..., None]) * torch.from_numpy(scales[e])[..., None]).reshape(rows, -1)
            assert torch.equal(got, want), (fc, e)
    router = next(n for n in model.graph.node if n.name == "/model/layers.1/moe/router/MatMul")
    checkpoint = load_file(next(iter(sorted(fixture_dir(RECIPE).glob("*.safetensors")))))
    assert np.array_equal(init[router.input[1]].T, checkpoint["model.layers.1.block_sparse_moe.gate.weight"].float().numpy())


def test_int4_generates_through_genai_and_exports_byte_identically(fixture_dir, exported, tmp_path):
    from phi3_export.api import quantize

    folder = fixture_dir(RECIPE, train_steps=60)
    manifests = [quantize(folder, tmp_path / f"out{k}", bits=4, targets=("cpu", "mobile")) for k in (0, 1)]
    digest = [{f["path"]: f["sha256"] for a in m["artifacts"] for f in a["files"]} for m in manifests]
    assert digest[0] == digest[1]
    assert json.loads((tmp_path / "out0" / "onnx-cpu" / "genai_config.json").read_text())["model"]["type"] == "phimoe"
    model = og.Model(str(tmp_path / "out0" / "onnx-cpu"))
    tokenizer = og.Tokenizer(model)
    text = "Explain the for statement.\n  It loops  over 3 items: [1, 2, 3]."
    assert list(tokenizer.encode(text)) == AutoTokenizer.from_pretrained(folder)(text).input_ids
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "Explain for."}]), add_generation_prompt=True)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(prompt))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) > len(tokenizer.encode(prompt))


@pytest.mark.parametrize("flags,message", [(("--format", "coreml"), "42B parameters"),
                                           (("--target", "dml", "--bits", "16"), "--target dml: PhiMoEForCausalLM's moe blocks need the QMoE/MoE op")])
def test_coreml_and_dml_refused_with_the_reason(flags, message, fixture_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(fixture_dir(RECIPE)),
                           "--out", str(tmp_path / "out"), "--quiet", *flags], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def _edit(folder, tmp_path, how: str):
    broken = tmp_path / how
    shutil.copytree(folder, broken)
    if how == "missing-expert":
        for shard in broken.glob("*.safetensors"):
            tensors = load_file(shard)
            tensors.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight", None)
            save_file(tensors, shard, metadata={"format": "pt"})
    else:  # the config says fewer experts than the checkpoint holds
        config = json.loads((broken / "config.json").read_text())
        config["num_local_experts"] = 3
        (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize("how,message", [
    ("missing-expert", "'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing"),
    ("expert-count", "'model.layers.0.block_sparse_moe.gate.weight' has shape [4, 128], but"),
])
def test_bad_checkpoint_one_line_error_nothing_written(how, message, fixture_dir, tmp_path):
    broken = _edit(fixture_dir(RECIPE), tmp_path, how)
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = subprocess.run([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(broken), "--out",
                           str(outs / "out"), "--quiet"], capture_output=True, text=True, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert list(outs.iterdir()) == []


def test_export_memory_flat_in_layer_count(tmp_path):
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes import load_recipe

    peaks = {}
    for layers in (2, 8):
        checkpoint = tmp_path / f"ckpt{layers}"
        make_fixture(load_recipe(RECIPE), checkpoint, layers=layers, hidden=1024, dtype=torch.bfloat16)
        result = run_measured([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(checkpoint), "--out",
                               str(tmp_path / f"out{layers}"), "--target", "cpu", "--quiet"], interval_s=0.005)
        assert result.returncode == 0, result.stderr
        peaks[layers] = result.peak_rss_anon_mb
    assert peaks[8] <= 1.3 * peaks[2], peaks


def test_folding_every_awq_group_leaves_logits_unchanged(fixture_dir):
    # Random positive scales in every group: attention (LayerNorm weight and bias), V->o under GQA,
    # the shared norm -> every expert's gate/up with the float router scaled alongside, and per-expert up->down.
    from test_phimoe_layer import our_logits

    from phi3_export.arch import architecture
    from phi3_export.quant.awq import expand_scale, fold_scale

    folder = fixture_dir(RECIPE)
    config = json.loads((folder / "config.json").read_text())
    tensors = {k: v.float() for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}
    ids = torch.tensor(_ids(folder, 40))
    before = our_logits(config, tensors, ids)
    gen = torch.Generator().manual_seed(1)
    groups = 0
    for layer in architecture(config["architectures"][0]).plan(config).decoder.layers:
        for group in layer.scaling_groups:
            kv = group.kv_shared
            channels = kv.kv_heads * kv.head_dim if kv else group.linears[0].shape[1]
            s = torch.exp(torch.randn(channels, generator=gen) * 0.5)
            assert expand_scale(group, s).shape[0] == group.linears[0].shape[1]
            fold_scale(tensors, group, s)
            groups += 1
    after = our_logits(config, tensors, ids)
    assert groups == 2 * (3 + config["num_local_experts"])
    assert (after - before).abs().max() <= 1e-4


def test_awq_leaves_rarely_routed_experts_to_rtn_and_says_which(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    folder = fixture_dir(RECIPE)
    kwargs = {"targets": ("cpu",), "keep_quantized": True}
    # 2 windows of 32 tokens: each token goes to 2 of 4 experts, so some get fewer than AWQ's 32-token minimum.
    awq = quantize(folder, tmp_path / "awq", method="awq", calib_samples=2, calib_seqlen=32, **kwargs)
    quantize(folder, tmp_path / "rtn", **kwargs)
    fallback = set(awq["rtn_fallback"])
    downs = [f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    starved = [name for name in downs if name in fallback]
    searched = [name for name in downs if name not in fallback]
    assert starved and searched, fallback
    q_awq, q_rtn = QuantizedCheckpoint(tmp_path / "awq" / "quantized"), QuantizedCheckpoint(tmp_path / "rtn" / "quantized")
    for name in starved:  # neither scaled (its up->down group was skipped) nor clipped: RTN's codes
        assert torch.equal(q_awq.packed(name)[0], q_rtn.packed(name)[0]), name
    for name in searched:
        assert not torch.equal(q_awq.packed(name)[0], q_rtn.packed(name)[0]), name
    decoder = OrtDecoder(tmp_path / "awq" / "onnx-cpu")
    logits, _ = decoder.step(_ids(folder, 16), decoder.empty_cache())
    assert np.isfinite(logits).all()
