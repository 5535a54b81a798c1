"""The command line: determinism, bad inputs (one line, non-zero, nothing at --out), flags."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from phi3_export.cli import main
from phi3_export.recipes import recipes_dir


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_version_and_help():
    assert _run("--version").output.startswith("phi3-export, version ")
    assert "--symmetric / --asymmetric" in _run("quantize", "--help").output


def test_two_runs_are_byte_identical(fixture_dir, tmp_path):
    for name in ("a", "b"):
        result = _run("quantize", "--checkpoint", fixture_dir("phi-4-mini"), "--out", tmp_path / name, "--bits", "4",
                      "--asymmetric", "--quiet")
        assert result.exit_code == 0, result.output
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and any(k.endswith("model.onnx.data") for k in a)


def test_manifest_lists_artifacts_with_hashes(fixture_dir, tmp_path):
    out = tmp_path / "out"
    result = _run("quantize", "--checkpoint", fixture_dir("phi-3-mini-4k"), "--out", out, "--target", "cpu,mobile", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == {"name": "phi-3-mini-4k", "how_chosen": "fixture"}
    assert [a["path"] for a in manifest["artifacts"]] == ["onnx-cpu", "onnx-mobile"]
    for artifact in manifest["artifacts"]:
        for entry in artifact["files"]:
            assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert not (out / "quantized").exists()
    assert manifest["versions"]["onnxruntime-genai"]


def _broken_checkpoint(fixture, tmp_path, how):
    folder = tmp_path / "ckpt"
    shutil.copytree(fixture, folder)
    if how == "missing-config":
        (folder / "config.json").unlink()
    elif how == "truncated":
        shard = folder / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "pickle":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif how == "mismatch":
        config = json.loads((folder / "config.json").read_text())
        del config["phi3_export_fixture"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD = [
    ("missing-config", [], "missing config.json"),
    ("truncated", [], "truncated"),
    ("pickle", [], "pickle checkpoints are refused"),
    ("fine", ["--recipe", "phi-9"], "unknown recipe 'phi-9'"),
    ("fine", ["--recipe", "TYPO"], "unknown field"),
    ("mismatch", ["--recipe", "phi-3-mini-4k"], "model.num_layers is 32 in the recipe but 2 in config.json"),
    ("fine", ["--recipe", "phi-3-mini-128k"], "model.rope.kind is 'longrope' in the recipe but 'default'"),
    ("fine", ["--block-size", "48"], "--block-size"),
    ("fine", ["--target", "tpu"], "unknown target 'tpu'"),
    ("fine", ["--bits", "16", "--target", "cpu"], "--bits 16: target cpu runs --bits 32 unquantized"),
]


@pytest.mark.parametrize("how,extra,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_one_line_error_nothing_written(how, extra, message, fixture_dir, tmp_path):
    folder = _broken_checkpoint(fixture_dir("phi-3-mini-4k"), tmp_path, how)
    if "TYPO" in extra:
        typo = tmp_path / "typo.yaml"
        typo.write_text((recipes_dir() / "phi-3-mini-4k.yaml").read_text().replace("symmetric:", "symetric:"))
        extra = ["--recipe", typo]
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(folder), "--out",
                           str(out_parent / "out"), "--quiet", *map(str, extra)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert list(out_parent.iterdir()) == []


def test_existing_out_is_refused_and_force_replaces_only_our_own_output(fixture_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("quantize", "--checkpoint", fixture_dir("phi-3-mini-4k"), "--out", out, "--quiet")
    assert result.exit_code == 2 and "already exists" in result.output
    # --force never deletes a folder phi3-export did not write.
    result = _run("quantize", "--checkpoint", fixture_dir("phi-3-mini-4k"), "--out", out, "--quiet", "--force")
    assert result.exit_code == 2 and "not written by phi3-export" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    for _ in range(2):  # the second run replaces the first's output
        result = _run("quantize", "--checkpoint", fixture_dir("phi-3-mini-4k"), "--out", out, "--quiet", "--force", "--target", "cpu")
        assert result.exit_code == 0 and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_ambiguous_checkpoint_lists_candidates(fixture_dir, tmp_path):
    # A checkpoint with published mini-128k dims matches mini-128k and 3.5-mini alike.
    from phi3_export.api import choose_recipe
    from phi3_export.arch import architecture
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.errors import Phi3ExportError
    from phi3_export.recipes import load_recipe

    ckpt = Checkpoint(fixture_dir("phi-3-mini-128k"))
    ckpt.config.pop("phi3_export_fixture")
    published = load_recipe("phi-3-mini-128k").model
    with pytest.raises(Phi3ExportError, match="phi-3-mini-128k, phi-3.5-mini"):
        choose_recipe(ckpt, published, None)
    facts = architecture("Phi3ForCausalLM").facts_from_config(ckpt.config, ckpt.tokenizer_kind)
    assert choose_recipe(ckpt, facts, None).how == "generic"


def test_fixture_command(tmp_path):
    result = _run("fixture", "--recipe", "phi-3-medium-4k", "--out", tmp_path / "fx", "--layers", "1")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "fx" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["phi3_export_fixture"]["recipe"] == "phi-3-medium-4k"
    unknown = tmp_path / "llama.yaml"
    unknown.write_text((recipes_dir() / "phi-3-mini-4k.yaml").read_text().replace("Phi3ForCausalLM", "LlamaForCausalLM"))
    refused = _run("fixture", "--recipe", unknown, "--out", tmp_path / "llama")
    assert refused.exit_code == 2 and "unknown architecture 'LlamaForCausalLM'" in refused.output


def test_int8_weights_at_fp32_compute_warn_about_cpu_speed(fixture_dir, tmp_path):
    # A tied table is int8 in the generic recipe; at accuracy level 1 that LM head is slow on CPU.
    args = ("quantize", "--checkpoint", fixture_dir("phi-4-mini"), "--recipe", "phi-4-mini", "--target", "cpu", "--quiet",
            "--lm-head", "int8")
    slow = _run(*args, "--out", tmp_path / "slow", "--accuracy-level", "1")
    assert slow.exit_code == 0 and "warning: int8 weights (lm_head) at accuracy level < 4 on target cpu" in slow.output
    fast = _run(*args, "--out", tmp_path / "fast", "--accuracy-level", "4")
    assert fast.exit_code == 0 and "warning" not in fast.output


def _commands(group=main, prefix=()):
    import click

    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        yield prefix + (name,), command


def test_every_command_teaches_with_examples_and_every_option_has_help():
    for path, command in _commands():
        # `recipes list/show` take no options: their group's help shows the examples.
        assert "Example" in _run(*path, "--help").output or path[:1] == ("recipes",), path
        undocumented = [p.name for p in command.params if getattr(p, "help", "") == "" and p.param_type_name == "option"]
        assert not [u for u in undocumented if u != "help"], (path, undocumented)


def test_quantize_and_sweep_share_one_option_vocabulary():
    quantize_opts = {o for p in main.commands["quantize"].params for o in p.opts}
    sweep_opts = {o for p in main.commands["sweep"].params for o in p.opts}
    shared = {"--method", "--block-size", "--symmetric", "--target", "--bits", "--accuracy-level", "--lm-head", "--max-length",
              "--calib-text", "--calib-samples", "--calib-seqlen", "--seed", "--quiet", "--checkpoint", "--recipe", "--out"}
    assert shared <= quantize_opts and shared <= sweep_opts


def test_sweep_grid_has_budget_and_accuracy_level_axes():
    from phi3_export.sweep import grid

    points = grid(("rtn", "gptq"), (32, 128), (False,), ("none", "80MB", "90MB"), (4, 1))
    folders = [p.folder for p in points]
    assert len(folders) == len(set(folders)) == 2 * 2 * (2 + 2)  # methods x levels x (block sizes + budgets)
    assert "gptq-80MB-a-al1" in folders and "rtn-g128a-al4" in folders
    budget = next(p for p in points if p.size_budget == "90MB")
    assert budget.block_size is None and "block_size" not in budget.quantize_options()
    assert budget.quantize_options()["size_budget"] == "90MB"
    # without budgets: the block-size grid alone, each target's own accuracy level
    assert [p.folder for p in grid(("awq",), (64,), (None,))] == ["awq-g64"]


@pytest.mark.parametrize("flag", ["--accuracy-level=5", "--accuracy-level=4,x", "--method=rtn,nope"])
def test_sweep_rejects_a_bad_axis_value_in_one_line(flag, tmp_path):
    result = _run("sweep", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), flag)
    assert result.exit_code == 2 and flag.split("=")[0] in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_recipe_typo_gets_a_suggestion_and_mismatches_list_every_field(fixture_dir):
    result = _run("recipes", "show", "phi-3-mini-4")
    assert result.exit_code == 2 and "did you mean 'phi-3-mini-4k'?" in result.output
    shown = _run("recipes", "show", "phi-3-vision-128k").output
    assert shown.startswith("# Phi3VForCausalLM: supported")
    from phi3_export.arch import architecture
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.check import check_recipe
    from phi3_export.errors import Phi3ExportError
    from phi3_export.recipes import load_recipe

    ckpt = Checkpoint(fixture_dir("phi-3-mini-4k"))
    facts = architecture("Phi3ForCausalLM").facts_from_config(ckpt.config, ckpt.tokenizer_kind)
    with pytest.raises(Phi3ExportError) as err:
        check_recipe(load_recipe("phi-3-medium-4k"), facts, is_fixture_of_recipe=False, source="config.json")
    message = str(err.value)
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
        assert f"model.{field}" in message, (field, message)
    assert "Value error" not in _run("quantize", "--checkpoint", fixture_dir("phi-3-mini-4k"), "--out", "x", "--block-size", "48").output


def test_chat_takes_an_out_folder_and_a_message_on_stdin(exported, tmp_path):
    out = exported("phi-3-mini-4k", targets=("mobile", "cpu"))
    proc = subprocess.run([sys.executable, "-m", "phi3_export", "chat", str(out), "--max-new-tokens", "4"], input="Explain for.",
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"using {out / 'onnx-cpu'}" in proc.stderr  # the cpu artifact, named
    assert proc.stdout.startswith("user: Explain for.\nassistant: ")
