"""Phi-3-small through every command (quantize RTN/AWQ, chat, validate, report, package, verify),
AWQ's scale folds on its plan, and the bad inputs the issue names."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from phi3_export.arch import architecture
from phi3_export.arch.phi3small_layer import Phi3SmallModel

RECIPE = "phi-3-small-8k"


def _cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "phi3_export", *map(str, args)], capture_output=True, text=True, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _model(folder, tensors=None) -> tuple[Phi3SmallModel, dict]:
    config = json.loads((folder / "config.json").read_text())
    model = Phi3SmallModel(config).eval()
    tensors = tensors or {k: v.float() for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}
    model.load_state_dict(tensors, strict=True)
    return model, config


def test_folding_every_awq_group_leaves_logits_unchanged(fixture_dir):
    # Random positive scales in every declared group: LayerNorm (weight and bias) -> head-group-major qkv,
    # the V rows (runs inside qkv, with their bias) -> dense under GQA, LayerNorm -> interleaved up_proj.
    from phi3_export.quant.awq import expand_scale, fold_scale

    folder = fixture_dir(RECIPE)
    model, config = _model(folder)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 900, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    gen = torch.Generator().manual_seed(1)
    groups = 0
    for layer in architecture(config["architectures"][0]).plan(config).decoder.layers:
        assert not any(g.prev is layer.mlp.gate_up for g in layer.scaling_groups)  # no up -> down: the GEGLU clamps
        for group in layer.scaling_groups:
            kv = group.kv_shared
            channels = kv.kv_heads * kv.head_dim if kv else group.linears[0].shape[1]
            s = torch.exp(torch.randn(channels, generator=gen) * 0.5)
            assert expand_scale(group, s).shape[0] == group.linears[0].shape[1]
            fold_scale(tensors, group, s)
            groups += 1
    folded, _ = _model(folder, tensors)
    with torch.no_grad():
        after = folded(ids)
    keep = torch.isfinite(before) & (before > torch.finfo(torch.float32).min)
    assert groups == 3 * config["num_hidden_layers"]
    assert (after - before)[keep].abs().max() <= 1e-4
    assert not torch.equal(tensors["model.layers.0.self_attn.query_key_value.weight"],
                           model.state_dict()["model.layers.0.self_attn.query_key_value.weight"])


@pytest.fixture(scope="module")
def trained(fixture_dir):
    return fixture_dir(RECIPE, train_steps=100)


def test_every_command_on_a_trained_fixture(trained, tmp_path):
    """quantize (RTN; ONNX cpu + mobile and Core ML) -> chat -> validate -> report -> package -> verify."""
    ckpt = trained
    out = tmp_path / "out"
    _cli("quantize", "--checkpoint", ckpt, "--out", out, "--format", "onnx,coreml", "--target", "cpu,mobile", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["format"] for a in manifest["artifacts"]} >= {"onnx", "coreml"}
    genai = json.loads((out / "onnx-cpu" / "genai_config.json").read_text())
    assert genai["model"]["type"] == "phi3small" and genai["search"]["past_present_share_buffer"] is True

    chat = _cli("chat", out / "onnx-cpu", "--prompt", "The cat", "--max-new-tokens", "8")
    assert "8 tokens" in chat.stdout + chat.stderr

    record = tmp_path / "validate.json"
    validated = _cli("validate", out, "--reference", ckpt, "--runs", "1", "--json", record, check=False)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]
    records = json.loads(record.read_text())["records"]
    cpu = next(r for r in records if r["artifact"].endswith("onnx-cpu") and r["provider"] == "cpu")
    assert cpu["accuracy"]["kld_mean"] < 0.02 and cpu["accuracy"]["top1_agreement"] > 0.9
    assert cpu["tokenizer"]["passed"] is True and all(check["passed"] for check in cpu["checks"])
    coreml = next(r for r in records if r["artifact"].endswith("coreml") and r["provider"] == "mil-reader")
    assert abs(coreml["accuracy"]["kld_mean"] - cpu["accuracy"]["kld_mean"]) < 1e-3  # same codes, same model

    _cli("report", record, "--out", tmp_path / "report")
    assert (tmp_path / "report" / "report.md").read_text().count("phi-3-small-8k") >= 2

    for target, flags in (("android", ()), ("ios", ("--with-onnx",))):
        bundle = tmp_path / f"bundle-{target}"
        _cli("package", out, "--target", target, *flags, "--out", bundle)
        verified = _cli("verify", bundle)
        assert "verified" in verified.stdout + verified.stderr


def test_awq_calibrates_on_what_the_model_sees_and_validates(trained, tmp_path):
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.stream import embedded

    # Layer 0's input in AWQ and in validate's reference: the table rows times muP's embedding scale (10).
    ckpt = Checkpoint(trained)
    plan = architecture(ckpt.config["architectures"][0]).plan(ckpt.config)
    ids = torch.tensor([[5, 17, 300]])
    table = ckpt.tensor(plan.decoder.embedding)
    assert plan.decoder.embedding_scale == 10.0
    torch.testing.assert_close(embedded(ckpt, plan.decoder, ids), table[ids] * 10.0)

    awq = tmp_path / "awq"
    _cli("quantize", "--checkpoint", trained, "--out", awq, "--method", "awq", "--calib-samples", "8", "--quiet")
    validated = _cli("validate", awq, "--reference", trained, "--no-speed", "--json", tmp_path / "awq.json", check=False)
    assert validated.returncode == 0, validated.stdout[-3000:]
    record = json.loads((tmp_path / "awq.json").read_text())["records"][0]
    assert record["settings"]["method"] == "awq" and record["accuracy"]["kld_mean"] < 0.02


def _with_config(folder, tmp_path, **changes):
    broken = tmp_path / "ckpt"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize("changes,flags,message", [
    ({"dense_attention_every_n_layers": 3}, (),
     "model.blocksparse.dense_attention_every_n_layers is 2 in the recipe but 3 in config.json"),
    ({"blocksparse_homo_head_pattern": True}, (), "model.blocksparse.homo_head_pattern is False in the recipe but True"),
    ({"rope_position_scale": 2.0}, (), "rope_position_scale: must be 1.0 for Phi3SmallForCausalLM"),
    ({}, ("--format", "coreai"), "--format coreai: not available for Phi3SmallForCausalLM"),
    # Not a fixture of the recipe any more: dimensions are checked too, the block settings among them.
    ({"phi3_export_fixture": None, "blocksparse_vert_stride": 5}, (), "model.blocksparse.vert_stride 8 vs 5"),
])
def test_bad_input_one_line_exit_2_nothing_written(changes, flags, message, fixture_dir, tmp_path):
    ckpt = _with_config(fixture_dir(RECIPE), tmp_path, **changes)
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = _cli("quantize", "--checkpoint", ckpt, "--out", outs / "out", "--recipe", RECIPE, "--quiet", *flags, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert list(outs.iterdir()) == []
