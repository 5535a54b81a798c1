import json
import shutil

import pytest
import torch

from phi3_export.arch import architecture
from phi3_export.checkpoint import Checkpoint
from phi3_export.checkpoint.check import check_recipe
from phi3_export.checkpoint.config import rope_settings
from phi3_export.errors import NotSupportedYet, Phi3ExportError
from phi3_export.recipes import load_recipe


def test_reads_tensors_lazily_with_shapes(fixture_dir):
    ckpt = Checkpoint(fixture_dir("phi-3-mini-4k"))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert name in ckpt.names
    assert ckpt.tensor(name).shape == ckpt.shape(name)
    rows = ckpt.rows("model.embed_tokens.weight", 3, 7)
    assert torch.equal(rows, ckpt.tensor("model.embed_tokens.weight")[3:7])
    assert ckpt.tokenizer_kind == "llama-sentencepiece"
    assert ckpt.fixture_recipe() == "phi-3-mini-4k"


def test_sharded_checkpoint_with_index(fixture_dir, tmp_path):
    # Save a fixture in several shards and read every tensor back through the index.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_dir("phi-3-mini-4k"))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(tmp_path)
    assert len({p for p in ckpt._where.values()}) > 1
    for name, tensor in model.state_dict().items():
        if name in ckpt:
            assert torch.equal(ckpt.tensor(name), tensor)


def test_byte_level_tokenizer_detected(fixture_dir):
    assert Checkpoint(fixture_dir("phi-4-mini")).tokenizer_kind == "byte-bpe"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(fixture_dir, tmp_path):
    folder = _copy(fixture_dir("phi-3-mini-4k"), tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(Phi3ExportError, match="config.json: missing config.json"):
        Checkpoint(folder)


def test_truncated_safetensors(fixture_dir, tmp_path):
    folder = _copy(fixture_dir("phi-3-mini-4k"), tmp_path / "c")
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(Phi3ExportError, match="model.safetensors: truncated safetensors file"):
        Checkpoint(folder)


def test_pickle_refused(fixture_dir, tmp_path):
    folder = _copy(fixture_dir("phi-3-mini-4k"), tmp_path / "c")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(Phi3ExportError, match="pytorch_model.bin: pickle checkpoints are refused"):
        Checkpoint(folder)


def test_rope_spellings_agree():
    published = {"rope_theta": 10000.0, "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [2.0]}}
    transformers5 = {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0], "long_factor": [2.0]}}
    assert rope_settings(published) == rope_settings(transformers5)
    assert rope_settings({"partial_rotary_factor": 0.75})["partial_rotary_factor"] == 0.75
    assert rope_settings({})["kind"] == "default"


def test_recipe_mismatch_names_field_and_values(fixture_dir):
    ckpt = Checkpoint(fixture_dir("phi-3-mini-4k"))
    facts = architecture("Phi3ForCausalLM").facts_from_config(ckpt.config, ckpt.tokenizer_kind)
    # A feature mismatch fails even for a fixture; dims are skipped only for its own recipe.
    with pytest.raises(Phi3ExportError, match=r"model.rope.kind is 'longrope' in the recipe but 'default' in config.json"):
        check_recipe(load_recipe("phi-3-mini-128k"), facts, is_fixture_of_recipe=True, source="x")
    check_recipe(load_recipe("phi-3-mini-4k"), facts, is_fixture_of_recipe=True, source="x")
    with pytest.raises(Phi3ExportError, match=r"model.num_layers is 32 in the recipe but 2 in config.json"):
        check_recipe(load_recipe("phi-3-mini-4k"), facts, is_fixture_of_recipe=False, source="x")


def test_unsupported_architectures_say_so():
    from phi3_export.arch import Architecture, register

    @register
    class Later(Architecture):  # every Phi architecture is supported now: a stand-in for the next one
        names = ("PhiLaterForCausalLM",)
        supported = False
        why_unsupported = "its blocks have no emitters yet"

    with pytest.raises(NotSupportedYet, match="not supported yet: PhiLaterForCausalLM .its blocks have no emitters yet."):
        architecture("PhiLaterForCausalLM")
    with pytest.raises(Phi3ExportError, match="unknown architecture 'LlamaForCausalLM'"):
        architecture("LlamaForCausalLM")


def test_fixture_config_records_recipe_and_avoids_vocab_collisions(fixture_dir):
    for recipe in ("phi-3-mini-4k", "phi-3-medium-4k", "phi-4-mini", "phi-3-mini-128k"):
        config = json.loads((fixture_dir(recipe) / "config.json").read_text())
        assert config["phi3_export_fixture"]["recipe"] == recipe
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        widths = {config["hidden_size"], 2 * config["intermediate_size"],
                  config["hidden_size"] + 2 * config["num_key_value_heads"] * head_dim}
        assert config["vocab_size"] not in widths
    medium = json.loads((fixture_dir("phi-3-medium-4k") / "config.json").read_text())
    assert medium["num_attention_heads"] // medium["num_key_value_heads"] == 4
    long = json.loads((fixture_dir("phi-3-mini-128k") / "config.json").read_text())
    assert long["rope_parameters"]["rope_type"] == "longrope"
    assert long["rope_parameters"]["short_factor"] != long["rope_parameters"]["long_factor"]
