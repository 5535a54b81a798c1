"""Size-budgeted mixed precision: parsing, the size model against real artifacts, the knapsack,
the sensitivities, impossible budgets, and the manifest's record."""

import itertools
import json
import random

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from phi3_export.cli import main
from phi3_export.errors import Phi3ExportError
from phi3_export.quant.budget import knapsack, parse_budget, parse_size


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


# ---- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, size, label", [
    ("850MB", 850_000_000, "850MB"), ("2.2GB", 2_200_000_000, "2.2GB"), ("2.2GiB", int(2.2 * 2**30), "2.2GiB"),
    ("123456", 123456, "123456B"), (" 1.5 mb ", 1_500_000, "1.5MB"), (7_000_000, 7_000_000, "7MB"), ("512KiB", 512 * 1024, "512KiB"),
])
def test_size_budgets_parse_bytes_and_units(value, size, label):
    assert parse_size(value) == (size, label)


@pytest.mark.parametrize("value", ["", "2.2XB", "GB", "-5MB", "1e9", "0", 0, -3, "2..2GB", True])
def test_a_bad_size_budget_is_an_error_naming_the_flag(value):
    with pytest.raises(Phi3ExportError, match="--size-budget"):
        parse_size(value)


def test_bits_per_weight_and_exclusivity():
    assert parse_budget(None, "4.5").bits_per_weight == 4.5 and parse_budget(None, 4.5).label == "4.5bpw"
    assert parse_budget(None, None) is None
    for bad in ("nan", "-1", "0", "x", "inf"):
        with pytest.raises(Phi3ExportError, match="--bits-per-weight"):
            parse_budget(None, bad)
    with pytest.raises(Phi3ExportError, match="--size-budget and --bits-per-weight"):
        parse_budget("1GB", 4.5)


def test_cli_budget_errors_are_one_line_exit_2_and_write_nothing(fixture_dir, tmp_path):
    ckpt, out = fixture_dir("phi-3-mini-4k"), tmp_path / "out"
    _one_line_error(_run("quantize", "--checkpoint", ckpt, "--out", out, "--size-budget", "lots"), "--size-budget", "'lots'")
    _one_line_error(_run("quantize", "--checkpoint", ckpt, "--out", out, "--bits-per-weight", "four"), "--bits-per-weight")
    _one_line_error(_run("quantize", "--checkpoint", ckpt, "--out", out, "--size-budget", "1GB", "--bits-per-weight", "5"),
                    "--size-budget and --bits-per-weight")
    _one_line_error(_run("quantize", "--checkpoint", ckpt, "--out", out, "--size-budget", "1GB", "--bits", "32"), "--bits 4 or 8")
    # below the smallest mix: the message names the flag and the smallest size in MB
    _one_line_error(_run("quantize", "--checkpoint", ckpt, "--out", out, "--size-budget", "100kB", "--target", "cpu"),
                    "--size-budget 100KB", "below the smallest possible decoder", "MB")
    _one_line_error(_run("quantize", "--checkpoint", ckpt, "--out", out, "--bits-per-weight", "2"),
                    "--bits-per-weight 2", "bits per weight")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, not even the sensitivity cache
    assert "--size-budget SIZE" in _run("quantize", "--help").output and "2.2GiB" in _run("quantize", "--help").output


# ---- the knapsack -----------------------------------------------------------------------------------


def test_knapsack_finds_the_optimum_of_small_problems():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 5)
        costs = [sorted(rng.sample(range(1, 40), 3)) for _ in range(n)]
        errors = [sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(n)]
        capacity = rng.randint(sum(c[0] for c in costs) - 5, sum(c[-1] for c in costs) + 5)
        feasible = [(sum(e[i] for e, i in zip(errors, picks)), picks) for picks in itertools.product(range(3), repeat=n)
                    if sum(c[i] for c, i in zip(costs, picks)) <= capacity]
        picks = knapsack(costs, errors, capacity)
        if not feasible:
            assert picks is None
            continue
        assert sum(c[i] for c, i in zip(costs, picks)) <= capacity
        assert sum(e[i] for e, i in zip(errors, picks)) == pytest.approx(min(feasible)[0])


def test_knapsack_with_coarse_units_still_fits():
    costs = [[1000, 1750, 2900]] * 50  # 50 tensors, room for some upgrades; 64 units only: costs round up
    errors = [[1.0 + i / 100, 0.6, 0.01] for i in range(50)]
    capacity = 50 * 1000 + 20_000
    picks = knapsack(costs, errors, capacity, units=64)
    assert sum(costs[0][p] for p in picks) <= capacity
    assert sum(costs[0][p] for p in picks) > capacity - 50 * (20_000 // 64 + 1)  # at most a unit per tensor lost


# ---- real artifacts -----------------------------------------------------------------------------------


def _initializer_bytes(folder):
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    sizes = {}
    for tensor in graph.initializer:
        entry = {e.key: e.value for e in tensor.external_data}
        sizes[tensor.name] = int(entry["length"]) if "length" in entry else len(tensor.raw_data)
    return sizes


def _prefix(item, storage):
    """The initializer-name prefix under which the decoder writes a plan tensor's bytes."""
    if item.kind == "lm_head" or item.kind == "table" and storage.quantized:
        return "lm_head."
    if item.kind in ("embedding", "table"):
        return "model.embed_tokens."
    return item.name.removesuffix(".weight").replace(".self_attn.", ".attn.") + "."


def _check_tensor_bytes(ckpt_dir, out, manifest):
    """Every choosable tensor's initializers add up to sizes.tensor_bytes of its storage, per target."""
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.check import checked_architecture
    from phi3_export.export.onnx.sizes import tensor_bytes
    from phi3_export.export.onnx.targets import TARGETS
    from phi3_export.quant.budget import choosable_tensors
    from phi3_export.quant.settings import QuantSettings

    ckpt = Checkpoint(ckpt_dir)
    plan = checked_architecture(ckpt).plan(ckpt.config)
    settings = QuantSettings(**manifest["settings"])
    items = choosable_tensors(plan, settings)
    assert set(settings.mix) == {item.name for item in items}  # the manifest names every tensor's choice
    checked = 0
    for artifact in manifest["artifacts"]:
        written = _initializer_bytes(out / artifact["path"])
        for item in items:
            storage = settings.storage(item.name, item.role)
            got = sum(n for name, n in written.items() if name.startswith(_prefix(item, storage)) and not name.endswith(".bias"))
            assert got == tensor_bytes(item.shape, storage, TARGETS[artifact["target"]].io_dtype, lookup=item.lookup), \
                (artifact["target"], item.name, storage.label)
            checked += 1
    return checked


def test_budget_run_fits_matches_its_prediction_and_records_the_mix(fixture_dir, tmp_path):
    """Untied model, asymmetric, two targets of different scale dtype: within budget, prediction exact."""
    ckpt, out = fixture_dir("phi-3-mini-4k"), tmp_path / "out"
    result = _run("quantize", "--checkpoint", ckpt, "--out", out, "--size-budget", "0.52MB", "--target", "cpu,dml",
                  "--asymmetric", "--calib-samples", "4", "--calib-seqlen", "64", "--quiet")
    assert result.exit_code == 0, result.output
    assert "size budget 0.52 MB:" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    block = manifest["size_budget"]
    assert block["budget_bytes"] == 520_000 and block["files"] == ["model.onnx", "model.onnx.data"]
    for artifact in manifest["artifacts"]:
        target = artifact["target"]
        achieved = sum((out / artifact["path"] / f).stat().st_size for f in block["files"])
        assert achieved == block["achieved_bytes"][target] <= block["budget_bytes"]
        assert abs(achieved - block["predicted_bytes"][target]) <= 0.01 * block["predicted_bytes"][target]
        assert artifact["name"] == f"phi-3-mini-4k-rtn-budget0.52MB-asym-onnx-{target}"
    mix = manifest["settings"]["mix"]
    assert sum(block["counts"].values()) == len(mix) == 10 and len(set(mix.values())) >= 2  # a real mix, not one choice
    assert block["achieved_bytes"]["cpu"] > block["minimum_bytes"]["cpu"]  # the room above the smallest mix was used
    assert set(block["sensitivity"]) == set(mix)
    from phi3_export.checkpoint import Checkpoint

    shapes = Checkpoint(ckpt).shape
    layer_linears = [name for name in mix if ".layers." in name]
    assert manifest["mix_linear_weights"] == {label: sum(np.prod(shapes(n)) for n in layer_linears if mix[n] == label)
                                              for label in sorted({mix[n] for n in layer_linears})}
    assert _check_tensor_bytes(ckpt, out, manifest) == 20
    assert not (tmp_path / ".out.budget-sensitivity.json").exists()
    # the artifact runs
    from phi3_export.validate.ort_decoder import OrtDecoder

    decoder = OrtDecoder(out / "onnx-cpu", threads=2)
    logits, _ = decoder.step(np.array([[1, 5, 9, 13]]), decoder.empty_cache())
    assert logits.shape[:2] == (1, 4) and np.isfinite(logits).all()


def test_tied_table_and_float_choices_are_sized_exactly(fixture_dir, tmp_path):
    """Tied model (GatherBlockQuantized + MatMulNBits share the table), an explicit mix with every kind of
    choice: the exact dry run equals the files, and each tensor its formula."""
    from phi3_export.api import quantize
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.check import checked_architecture
    from phi3_export.export.onnx.sizes import predict_decoder_bytes
    from phi3_export.export.onnx.targets import TARGETS, ResolvedTarget
    from phi3_export.quant.budget import choosable_tensors
    from phi3_export.quant.settings import QuantSettings

    ckpt_dir, out = fixture_dir("phi-4-mini"), tmp_path / "out"
    ckpt = Checkpoint(ckpt_dir)
    plan = checked_architecture(ckpt).plan(ckpt.config)
    items = choosable_tensors(plan, QuantSettings(4, "rtn", 32, True, 4))
    assert items[0].kind == "table" and items[0].lookup
    labels = ["int8-g128", "int4-g32", "fp16", "int4-g128"]
    mix = {item.name: labels[i % len(labels)] for i, item in enumerate(items)}
    manifest = quantize(ckpt_dir, out, targets=("cpu",), mix=mix)
    assert manifest["settings"]["mix"] == mix and manifest["artifacts"][0]["name"].startswith("phi-4-mini-rtn-mix")
    assert _check_tensor_bytes(ckpt_dir, out, manifest) == len(items)
    folder = out / "onnx-cpu"
    target = ResolvedTarget(TARGETS["cpu"], manifest["artifacts"][0]["max_length"], manifest["artifacts"][0]["accuracy_level"])
    predicted = predict_decoder_bytes(ckpt.shape, plan, QuantSettings(**manifest["settings"]), target, ckpt.config)
    assert predicted == {f: (folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data")}
    with pytest.raises(Phi3ExportError, match="not a tensor a mix can choose"):
        quantize(ckpt_dir, tmp_path / "bad", targets=("cpu",), mix={"model.norm.weight": "int4-g32"})


def test_bits_per_weight_limits_the_choosable_tensors_average(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    out = tmp_path / "out"
    manifest = quantize(fixture_dir("phi-4-mini"), out, targets=("cpu",), bits_per_weight=6.0, calib_samples=4, calib_seqlen=64)
    block = manifest["size_budget"]
    fixed, weights = block["fixed_bytes"]["cpu"], block["choosable_weights"]
    assert block["bits_per_weight"] == 6.0 and block["budget_bytes"] == int(6.0 * weights / 8) + fixed
    assert block["achieved_bytes"]["cpu"] <= block["budget_bytes"]
    assert manifest["artifacts"][0]["name"] == "phi-4-mini-rtn-budget6bpw-sym-onnx-cpu"


# ---- sensitivities -------------------------------------------------------------------------------------


def test_sensitivities_order_the_candidates_and_resume_fingerprints_see_the_mix(fixture_dir):
    from dataclasses import replace

    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.check import checked_architecture
    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.quant.awq_search import AwqOptions
    from phi3_export.quant.budget import choosable_tensors
    from phi3_export.quant.budget_sensitivity import measure_errors
    from phi3_export.quant.calibrate import fingerprint
    from phi3_export.quant.settings import QuantSettings

    ckpt = Checkpoint(fixture_dir("phi-3-mini-4k"))
    arch = checked_architecture(ckpt)
    plan = arch.plan(ckpt.config)
    settings = QuantSettings(4, "rtn", 32, True, 4)
    items = choosable_tensors(plan, settings)
    report = {}
    errors = measure_errors(ckpt, arch, plan, corpus_text("calibration"), AwqOptions(samples=4, seqlen=64), items, report=report)
    assert set(errors) == {item.name for item in items}
    assert len(report["gains"]) == len(plan.decoder.layers) and all(g > 0 for g in report["gains"]) and report["direction"] > 0
    for name, e in errors.items():
        # 8 bits: ~1/289 of 4 bits' noise power
        assert 0.0 < e["int8-g128"] < min(e["int4-g128"], e["int4-g32"]) / 50, (name, e)
        assert e.get("fp16", 0.0) == 0.0
    # kept float: only tiny tensors outside AWQ's scaling groups (here the 1024 x 64 head and table)
    assert {item.kind for item in items if any(not s.quantized for s in item.candidates)} == {"embedding", "lm_head"}
    # the mix is in the settings the resume fingerprint hashes: another mix is another run
    options = [AwqOptions()]
    mixed = replace(settings, mix={items[0].name: "int8-g128"})
    assert fingerprint(ckpt, settings, "awq", options, "t") != fingerprint(ckpt, mixed, "awq", options, "t")


def test_one_sensitivity_cache_serves_every_budget_and_only_its_own_checkpoint(fixture_dir, tmp_path, monkeypatch):
    """`sweep` hands every budget point one cache: measured once, reused at another budget, and
    measured again for a checkpoint of the same config but other weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from phi3_export.api import quantize
    from phi3_export.quant import budget_sensitivity

    calls = []
    measure = budget_sensitivity.measure_errors
    monkeypatch.setattr(budget_sensitivity, "measure_errors", lambda *a, **k: calls.append(1) or measure(*a, **k))
    ckpt, cache = fixture_dir("phi-3-mini-4k"), tmp_path / "sensitivities.json"
    runs = {budget: quantize(ckpt, tmp_path / budget, targets=("cpu",), size_budget=budget, calib_samples=4, calib_seqlen=64,
                             sensitivity_cache=cache) for budget in ("0.52MB", "0.56MB")}
    assert len(calls) == 1 and cache.is_file()  # kept for the caller, which removes it
    assert runs["0.52MB"]["size_budget"]["sensitivity"] == runs["0.56MB"]["size_budget"]["sensitivity"]
    other = tmp_path / "other"  # same config.json, one weight changed
    shutil.copytree(ckpt, other)
    shard = next(other.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("o_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    quantize(other, tmp_path / "other-out", targets=("cpu",), size_budget="0.52MB", calib_samples=4, calib_seqlen=64,
             sensitivity_cache=cache)
    assert len(calls) == 2
