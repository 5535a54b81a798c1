"""Full-size random fixtures from the plan: Phi-3.5-MoE's config, tensor list and counts; streamed shards."""

import math

import pytest
import torch
from safetensors import safe_open

from phi3_export import api
from phi3_export.arch import architecture
from phi3_export.checkpoint import Checkpoint
from phi3_export.checkpoint.check import check_tensors, expected_tensors, mismatches
from phi3_export.fixtures.full_size import _random, full_size_config, parameter_count, write_full_size, write_safetensors
from phi3_export.recipes import load_recipe


def test_parameter_counts_are_the_published_ones():
    assert parameter_count(load_recipe("phi-3.5-moe")) == 41_873_153_344  # "41.9B" on the model card
    assert parameter_count(load_recipe("phi-3-mini-4k")) == 3_821_079_552
    # 2 layers: two layers' attention (biased), router and 16 experts, plus both tables and the final norm
    two = parameter_count(load_recipe("phi-3.5-moe"), 2)
    per_layer = (4096 * 4096 + 4096) * 2 + (4096 * 1024 + 1024) * 2 + 16 * 4096 + 16 * 3 * 4096 * 6400 + 4 * 4096
    assert two == 2 * per_layer + 2 * 32064 * 4096 + 32064 + 2 * 4096


def test_moe_config_has_the_recipes_dimensions_in_the_published_layout():
    recipe = load_recipe("phi-3.5-moe")
    config = full_size_config(recipe, 2)
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (16, 2, 6400)
    assert config["attention_bias"] and config["lm_head_bias"] and config["rope_scaling"]["type"] == "longrope"
    assert len(config["rope_scaling"]["short_factor"]) == 64 and config["rope_scaling"]["short_mscale"] > 1
    assert config["phi3_export_fixture"] == {"recipe": "phi-3.5-moe", "full_size": True, "random": True, "seed": 0}
    arch = architecture(config["architectures"][0])
    facts = arch.facts_from_config(config, recipe.model.tokenizer)
    assert [f for f, _, _ in mismatches(recipe.model, facts, dims=True)] == ["num_layers"]
    shapes = expected_tensors(arch.plan(config))
    assert shapes["model.layers.1.block_sparse_moe.experts.15.w2.weight"] == (4096, 6400)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (1024,) and shapes["lm_head.bias"] == (32064,)


def test_streamed_safetensors_read_back(tmp_path):
    shapes = {"b": (3, 5), "a": (7,), "c": (2, 2, 2)}
    made = {n: _random(n, s, 0, torch.bfloat16) for n, s in shapes.items()}

    def make(name):
        return made[name]

    path = tmp_path / "x.safetensors"
    assert write_safetensors(path, shapes, torch.bfloat16, make) == 2 * sum(math.prod(s) for s in shapes.values())
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["a", "b", "c"] and f.metadata() == {"format": "pt"}
        for name in shapes:
            assert torch.equal(f.get_tensor(name), made[name])
    with pytest.raises(RuntimeError, match="header says"):
        write_safetensors(path, {"a": (8,)}, torch.bfloat16, make)


SMALL = {  # the writer at small widths: the same code path as the 84 GB shape (plan -> tensors, a shard per layer)
    "phi-3.5-moe": {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 1, "head_dim": 32, "intermediate_size": 64,
                    "num_experts": 4},
    "phi-3-mini-4k": {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 4, "head_dim": 32, "intermediate_size": 256},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_fixture_written_from_the_plan_quantizes(tmp_path, name):
    real = load_recipe(name)
    model = real.model.model_copy(update={"num_layers": 2, "vocab_size": 1088, **SMALL[name]})
    recipe = real.model_copy(update={"model": model})
    ckpt_dir = tmp_path / "ckpt"
    config = write_full_size(recipe, ckpt_dir)
    ckpt = Checkpoint(ckpt_dir)
    check_tensors(ckpt, architecture(config["architectures"][0]).plan(config))
    assert sorted(p.name for p in ckpt_dir.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sum(math.prod(ckpt.shape(n)) for n in ckpt.names) == parameter_count(recipe)
    assert abs(float(ckpt.tensor("model.layers.0.input_layernorm.weight").mean()) - 1) < 0.01  # norms ~1
    if name == "phi-3.5-moe":
        assert config["num_local_experts"] == 4
        assert abs(float(ckpt.tensor("model.layers.0.self_attn.q_proj.bias").mean())) < 0.01  # biases ~0
    manifest = api.quantize(ckpt_dir, tmp_path / "out", targets=("cpu",))
    assert [a["target"] for a in manifest["artifacts"]] == ["cpu"]
