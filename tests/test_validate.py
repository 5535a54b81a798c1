"""`validate`: the streamed reference is the model, accuracy figures catch damage, checks hold."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from phi3_export.checkpoint import Checkpoint
from phi3_export.progress import Progress
from phi3_export.validate.reference import StreamedReference
from phi3_export.validate.run import ValidateOptions, failed_checks, validate_artifacts

TRAINED = {"train_steps": 150}


def _validate(path, reference, tmp_path, **kwargs):
    options = ValidateOptions(cache_dir=tmp_path / "cache", speed=False, window=256, **kwargs)
    return validate_artifacts(path, reference, options, Progress(enabled=False))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "phi3_export", *map(str, args)], check=False, capture_output=True, text=True)


@pytest.mark.parametrize("recipe, length", [("phi-3-mini-4k", 2100), ("phi-3-medium-4k", 64), ("phi-3-mini-128k", 4200)])
def test_streamed_reference_matches_the_transformers_model(recipe, length, fixture_dir):
    # Past the sliding window (mini-4k) and past the original context (LongRoPE, 128k).
    folder = fixture_dir(recipe)
    ids = torch.randint(0, 200, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits[0].numpy()
    ref = StreamedReference(Checkpoint(folder))
    got = next(iter(ref.logits(ref.hidden_states(ids))))
    assert np.abs(got - expected).max() <= 1e-4


def test_fp32_artifact_agrees_and_int4_differs(exported, fixture_dir, tmp_path):
    reference = fixture_dir("phi-3-mini-4k", **TRAINED)
    fp32 = _validate(exported("phi-3-mini-4k", TRAINED, bits=32, targets=("cpu",)), reference, tmp_path)["records"][0]
    int4 = _validate(exported("phi-3-mini-4k", TRAINED, bits=4, targets=("cpu",)), reference, tmp_path)["records"][0]
    assert fp32["status"] == int4["status"] == "ok"
    assert fp32["accuracy"]["kld_mean"] < 1e-6 and fp32["accuracy"]["top1_agreement"] == 1.0
    assert abs(fp32["accuracy"]["perplexity_change_pct"]) < 1e-3
    assert int4["accuracy"]["kld_mean"] > 1e-5 and int4["accuracy"]["top1_agreement"] < 1.0
    assert int4["accuracy"]["kld_p99"] >= int4["accuracy"]["kld_mean"]
    assert fp32["accuracy"]["positions"] == int4["accuracy"]["positions"] == fp32["tokenizer"]["reference_tokens"] - 1
    # greedy chat: the fp32 artifact never leaves the reference's path
    assert [g["first_divergence"] for g in fp32["generation"]] == [None] * len(fp32["generation"])
    # the 2047-token sliding window is probed through prefill and KV-cache decode
    probe = fp32["long_context"][0]
    assert probe["probe"] == "past_sliding_window" and probe["decode_past"]["positions"] == 64
    assert probe["decode_past"]["kld_max"] < 1e-6 and probe["prefill_past"]["top1_agreement"] == 1.0


def test_long_rope_probe_past_the_original_context(exported, fixture_dir, tmp_path):
    out = exported("phi-3-mini-128k", bits=32, targets=("cpu",))
    record = _validate(out, fixture_dir("phi-3-mini-128k"), tmp_path)["records"][0]
    probe = next(p for p in record["long_context"] if p["probe"] == "longrope_past_original_context")
    assert probe["threshold"] == 4096 and probe["status"] == "ok"
    assert probe["prefill_past"]["kld_max"] < 1e-5 and probe["decode_past"]["kld_max"] < 1e-5


def _zero_scales(folder, rows):
    """Zero the last ``rows`` output rows' scales (V rows) of layer 0's qkv MatMulNBits: those weights become 0."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "layers.0" in n.name and "qkv" in n.name)
    init = next(i for i in model.graph.initializer if i.name == node.input[2])
    where = {e.key: e.value for e in init.external_data}
    blocks = init.dims[-1] if len(init.dims) > 1 else None
    per_row = blocks or next(a.i for a in node.attribute if a.name == "K") // next(a.i for a in node.attribute if a.name == "block_size")
    n_rows = next(a.i for a in node.attribute if a.name == "N")
    with open(folder / where["location"], "r+b") as f:
        f.seek(int(where["offset"]) + 4 * per_row * (n_rows - rows))
        f.write(b"\0" * 4 * per_row * rows)


def test_damaged_weights_raise_kld(exported, fixture_dir, tmp_path):
    reference = fixture_dir("phi-3-mini-4k", **TRAINED)
    out = exported("phi-3-mini-4k", TRAINED, bits=4, targets=("cpu",))
    damaged = shutil.copytree(out, tmp_path / "damaged")
    _zero_scales(damaged / "onnx-cpu", rows=16)
    good = _validate(out, reference, tmp_path)["records"][0]["accuracy"]
    bad = _validate(damaged, reference, tmp_path)["records"][0]["accuracy"]
    # 16 of 320 qkv rows (one V head's) in one of two layers: perplexity barely moves, the KLD says so
    assert bad["kld_mean"] > 1.1 * good["kld_mean"] and bad["kld_p99"] > good["kld_p99"]


def test_broken_tokenizer_is_caught(exported, fixture_dir, tmp_path):
    reference = fixture_dir("phi-3-mini-4k", **TRAINED)
    broken = shutil.copytree(exported("phi-3-mini-4k", TRAINED, bits=4, targets=("cpu",)), tmp_path / "broken")
    path = broken / "onnx-cpu" / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    a, b = "▁the", "▁a"  # two frequent tokens trade ids: text still round-trips, ids do not
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec))
    result = _cli("validate", broken, "--reference", reference, "--no-speed", "--window", "256", "--cache-dir", tmp_path / "c",
                  "--json", tmp_path / "r.json", "--quiet")
    assert result.returncode == 1, result.stderr
    assert "tokenizer_parity" in result.stderr
    parity = json.loads((tmp_path / "r.json").read_text())["records"][0]["tokenizer"]
    assert parity["ids_equal"] is False and parity["first_mismatch"] is not None


def test_missing_providers_are_not_run_with_structural_checks(exported, fixture_dir, tmp_path):
    out = exported("phi-3-mini-4k", TRAINED, bits=4, targets=("dml", "mobile"))
    result = _cli("validate", out, "--reference", fixture_dir("phi-3-mini-4k", **TRAINED), "--providers", "dml,xnnpack",
                  "--no-speed", "--window", "256", "--cache-dir", tmp_path / "c", "--json", tmp_path / "r.json", "--quiet")
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "r.json").read_text())["records"]
    assert {(r["target"], r["provider"]) for r in records} == {(t, p) for t in ("dml", "mobile") for p in ("dml", "xnnpack")}
    for r in records:
        assert r["status"] == "not run" and r["reason"] and "accuracy" not in r and "speed" not in r
    dml = next(r for r in records if r["target"] == "dml")
    passed = {c["name"]: c["passed"] for c in dml["checks"]}
    assert passed["no_control_flow"] is passed["dml_provider_options"] is passed["max_length_cap"] is True
    mobile = {c["name"]: c for c in next(r for r in records if r["target"] == "mobile")["checks"]}
    assert mobile["accuracy_level"]["passed"] is True and mobile["nnapi_op_coverage"]["nodes"] > 0
    assert "not checked" in mobile["qnn_op_coverage"]["detail"]


def test_speed_and_memory_are_measured_in_their_own_process(exported, fixture_dir, tmp_path):
    out = exported("phi-3-mini-4k", TRAINED, bits=4, targets=("cpu",))
    options = ValidateOptions(cache_dir=tmp_path / "cache", window=256, prompt_lengths=(16, 4090), new_tokens=8, runs=3)
    record = validate_artifacts(out, fixture_dir("phi-3-mini-4k", **TRAINED), options, Progress(enabled=False))["records"][0]
    speed = record["speed"]["16"]
    assert speed["prefill_tokens_per_s"]["runs"] == 3 and speed["decode_tokens_per_s"]["median"] > 0
    assert speed["prefill_tokens_per_s"]["min"] <= speed["prefill_tokens_per_s"]["median"] <= speed["prefill_tokens_per_s"]["max"]
    assert record["speed"]["4090"]["status"] == "not run"  # 4090 + 8 tokens exceed max_length 4096
    assert 0 < record["memory"]["peak_rss_anon_mb"] <= record["memory"]["peak_rss_mb"]
    kv = record["kv_cache_bytes"]
    assert kv["at_max_length"] == kv["per_token"] * 4096


def test_reference_logits_are_cached(exported, fixture_dir, tmp_path):
    reference = fixture_dir("phi-3-mini-4k", **TRAINED)
    out = exported("phi-3-mini-4k", TRAINED, bits=4, targets=("cpu",))
    first = _validate(out, reference, tmp_path)
    cached = sorted((tmp_path / "cache").rglob("window-*.npy"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = _validate(out, reference, tmp_path)
    assert cached and [p.stat().st_mtime_ns for p in cached] == stamps
    assert again["records"][0]["accuracy"] == first["records"][0]["accuracy"]
    assert failed_checks(again) == []


def test_bad_paths_are_one_line_errors(fixture_dir, tmp_path):
    result = _cli("validate", tmp_path, "--reference", fixture_dir("phi-3-mini-4k"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path}: no manifest.json here or in its parent (not a phi3-export output)"]


@pytest.mark.parametrize("n, window, stride", [(4233, 256, 256), (1000, 256, 128), (300, 256, 100), (100, 256, 256)])
def test_windows_score_every_token_after_the_first_once(n, window, stride):
    from phi3_export.validate.accuracy import windows

    scored = []
    for start, first in windows(n, window, stride):
        length = min(window, n - 1 - start)
        scored += [start + p + 1 for p in range(first, length)]  # the token each scored prediction predicts
    assert scored == list(range(1, n))
