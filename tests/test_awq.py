"""AWQ: folding is exact, the search is deterministic, its output exports and runs, it streams."""

import json

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from transformers import AutoModelForCausalLM

from phi3_export.arch import architecture
from phi3_export.checkpoint import Checkpoint
from phi3_export.quant.awq import expand_scale, fold_scale


@pytest.mark.parametrize("recipe", ["phi-3-mini-4k", "phi-3-medium-4k", "phi-4-mini"])
def test_folding_every_group_leaves_logits_unchanged(recipe, fixture_dir):
    # Random positive scales in every declared group, V->o_proj under GQA included.
    folder = fixture_dir(recipe)
    ckpt = Checkpoint(folder)
    plan = architecture("Phi3ForCausalLM").plan(ckpt.config)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    state = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in plan.decoder.layers:
            weights = {name: state[name] for name in layer.tensors()}
            for group in layer.scaling_groups:
                channels = group.linears[0].shape[1]
                if group.kv_shared:
                    channels = group.kv_shared.kv_heads * group.kv_shared.head_dim
                s = torch.exp(torch.randn(channels, generator=gen) * 0.5)
                assert expand_scale(group, s).shape[0] == group.linears[0].shape[1]
                fold_scale(weights, group, s)  # in place, on the model's own tensors
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-4
    o_proj = plan.decoder.layers[0].attention.o.weight
    assert not torch.allclose(state[o_proj], AutoModelForCausalLM.from_pretrained(folder).state_dict()[o_proj])


def test_awq_exports_and_generates_deterministically(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    folder = fixture_dir("phi-3-medium-4k", train_steps=150)
    manifests = [quantize(folder, tmp_path / f"out{k}", method="awq", targets=("cpu",), block_size=32, calib_samples=8,
                          calib_seqlen=64) for k in (0, 1)]
    files = [{f["path"]: f["sha256"] for a in m["artifacts"] for f in a["files"]} for m in manifests]
    assert files[0] == files[1]
    assert manifests[0]["artifacts"][0]["name"] == "phi-3-medium-4k-awq-w4g32s-onnx-cpu"
    model = og.Model(str(tmp_path / "out0" / "onnx-cpu"))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=40)
    generator = og.Generator(model, params)
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "Explain for."}]), add_generation_prompt=True)
    generator.append_tokens(tokenizer.encode(prompt))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) > len(tokenizer.encode(prompt))
    assert not list(tmp_path.glob(".out*"))  # the resumable work folder is gone after success


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_with_a_group_linear_kept_float(method, fixture_dir, tmp_path):
    """A mix (or override) keeping qkv_proj float: its group still searches on what is quantized,
    the float linear is stored as given, nothing divides by a float storage's block size."""
    from phi3_export.api import quantize
    from phi3_export.quant.qcheckpoint import QuantizedCheckpoint

    folder = fixture_dir("phi-3-mini-4k")
    qkv, o = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    quantize(folder, tmp_path / "out", method=method, targets=("cpu",), calib_samples=2, calib_seqlen=32,
             keep_quantized=True, mix={qkv: "fp16"})
    stored = QuantizedCheckpoint(next((tmp_path / "out").glob("quantized*")))
    assert not stored.is_quantized(qkv) and stored.is_quantized(o)
    original, kept = Checkpoint(folder).tensor(qkv, None).float(), stored.float(qkv)
    q_rows = original.shape[1]  # the q rows: no scaling group folds into them once qkv_proj's own is skipped
    assert torch.allclose(kept[:q_rows], original[:q_rows], rtol=1e-3, atol=1e-6) and torch.isfinite(kept).all()


def test_interrupted_awq_resumes_from_last_finished_layer(fixture_dir, tmp_path, monkeypatch):
    from phi3_export import api
    from phi3_export.quant import awq

    folder = fixture_dir("phi-3-mini-4k", layers=3)
    kwargs = {"method": "awq", "targets": ("cpu",), "calib_samples": 4, "calib_seqlen": 32}
    reference = api.quantize(folder, tmp_path / "ref", **kwargs)

    calls = []
    real = awq.awq_layer

    def crash_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(awq, "awq_layer", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(folder, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / ".out.awq-work" / "awq_state.json").read_text())["layers_done"] == 2
    calls.clear()
    monkeypatch.setattr(awq, "awq_layer", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = api.quantize(folder, tmp_path / "out", **kwargs)
    assert len(calls) == 1  # only the unfinished third layer ran again
    digest = lambda m: {f["path"]: f["sha256"] for a in m["artifacts"] for f in a["files"]}
    assert digest(resumed) == digest(reference)


def test_awq_memory_flat_in_layer_count(peaks_by_depth, tmp_path):
    from phi3_export.recipes import recipes_dir

    # Memory does not depend on how many candidates the searches score: a 2-point alpha grid
    # and no clip search keep this test short (16 layers at width 1024: 21 s alone, 59 s with
    # the clip search, which holds one linear's candidates at a time whatever the depth).
    recipe = tmp_path / "fast-awq.yaml"
    recipe.write_text((recipes_dir() / "phi-3-mini-4k.yaml").read_text().replace(
        "quantization:\n", "quantization:\n  awq: {alpha_grid: 2, clip: false}\n", 1))
    # One run per depth: with the CLI's bounded heap (memory.bound_heap) AWQ's per-layer peak
    # is steady (510-550 MB at 2 and at 16 layers); glibc's default let it spike to ~740 MB.
    peaks = peaks_by_depth(tmp_path, "--method", "awq", "--recipe", str(recipe), "--target", "cpu",
                           "--calib-samples", "2", "--calib-seqlen", "32")
    shallow, deep = sorted(peaks)  # the depths of conftest.WIDE
    assert peaks[deep] <= 1.3 * peaks[shallow], peaks
    assert np.isfinite(peaks[shallow])
