"""PhiMoELayer (our fp32 Phi-3.5-MoE layer) and the PhiMoE fixture against transformers' PhimoeForCausalLM.

transformers 5.23's PhimoeRotaryEmbedding never applies LongRoPE's long factors: past the
original context it keeps the short factors and only switches to ``long_mscale``. Our layer
follows the published model (long factors past the original context), so long sequences are
compared with transformers whose rotary embedding uses the frequencies transformers' own
LongRoPE update selects (``with_long_factors``); ``test_transformers_keeps_short_factors``
pins the discrepancy down.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from phi3_export.arch.phimoe_layer import PhiMoELayer, rotary_embedding, sparsemixer_top2
from phi3_export.fixtures.phimoe import published_tensors, write_shards

ORIGINAL = 64
SHORT, LONG = 40, 100  # sequence lengths below and past the original context

# Published key layout (rope_scaling + rope_theta), shrunk: 4 experts, GQA 4/2, head_dim 16.
CONFIG = {
    "architectures": ["PhiMoEForCausalLM"],
    "model_type": "phimoe",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "attention_bias": True,
    "lm_head_bias": True,
    "rms_norm_eps": 1e-5,
    "router_jitter_noise": 0.01,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": ORIGINAL,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.0 + 0.5 * i * i for i in range(8)],
        "short_mscale": 1.1,
        "long_mscale": 1.3,
        "original_max_position_embeddings": ORIGINAL,
    },
    "sliding_window": None,
    "tie_word_embeddings": False,
}


def _hf_model(config: dict = CONFIG, seed: int = 0):
    from transformers import PhimoeConfig, PhimoeForCausalLM

    hf = PhimoeConfig(**config)
    hf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = PhimoeForCausalLM(hf).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that every part (biases, experts) moves the logits
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "layernorm" in name or name.startswith("model.norm.w") else 0.15 * noise)
    return model


def with_long_factors(model):
    """transformers' rotary embedding using the frequencies its LongRoPE update picked (long past the original context)."""
    rotary = model.model.rotary_emb
    rotary.rope_init_fn = lambda *args, **kwargs: (rotary.inv_freq, rotary.attention_scaling)
    return model


def _mask(seq: int, window: int | None) -> torch.Tensor:
    query, key = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    visible = (key <= query) & ((key > query - window) if window else True)
    return torch.zeros(seq, seq).masked_fill(~visible, float("-inf"))[None, None]


def load_layers(config: dict, tensors: dict[str, torch.Tensor]) -> list[PhiMoELayer]:
    layers = []
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        layer = PhiMoELayer(config).eval()
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
        layers.append(layer)
    return layers


@torch.no_grad()
def our_logits(config: dict, tensors: dict[str, torch.Tensor], ids: torch.Tensor, layers=None) -> torch.Tensor:
    layers = layers or load_layers(config, tensors)
    x = F.embedding(ids, tensors["model.embed_tokens.weight"])
    embeddings = rotary_embedding(config, torch.arange(ids.shape[1])[None])
    mask = _mask(ids.shape[1], config.get("sliding_window"))
    for layer in layers:
        x = layer(x, position_embeddings=embeddings, attention_mask=mask)
    x = F.layer_norm(x, x.shape[-1:], tensors["model.norm.weight"], tensors["model.norm.bias"], config["rms_norm_eps"])
    return F.linear(x, tensors["lm_head.weight"], tensors["lm_head.bias"])


def _ids(seq: int, batch: int = 2, vocab: int = CONFIG["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seq))


def test_layer_names_are_the_published_tensor_names():
    names = set(PhiMoELayer(CONFIG).state_dict())
    assert "block_sparse_moe.experts.3.w2.weight" in names and "block_sparse_moe.gate.weight" in names
    assert "self_attn.q_proj.bias" in names and "input_layernorm.bias" in names
    published = {k.removeprefix("model.layers.0.") for k in published_tensors(_hf_model().state_dict()) if k.startswith("model.layers.0.")}
    assert names == published


def test_published_split_is_what_transformers_saves(tmp_path):
    """Our w1/w3/w2 split of the fused experts equals transformers' own reverse conversion."""
    from safetensors.torch import load_file

    model = _hf_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    ours = published_tensors(model.state_dict())
    assert set(saved) == set(ours)
    assert all(torch.equal(saved[k], ours[k]) for k in saved)


def test_sharded_checkpoint_loads(tmp_path):
    from transformers import PhimoeForCausalLM

    model = _hf_model()
    files = write_shards(published_tensors(model.state_dict()), tmp_path, max_bytes=100_000)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded, info = PhimoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("seq", [SHORT, LONG])
def test_rotary_embedding(seq):
    from transformers import PhimoeConfig
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    hf = PhimoeConfig(**CONFIG)
    positions = torch.arange(seq)[None]
    cos, sin = rotary_embedding(CONFIG, positions)
    inv_freq, _ = _compute_longrope_parameters(hf, None, seq_len=seq)  # long factors past the original context
    emb = positions[..., None].float() * inv_freq
    emb = torch.cat((emb, emb), -1)
    mscale = CONFIG["rope_scaling"]["long_mscale" if seq > ORIGINAL else "short_mscale"]
    assert torch.equal(cos, emb.cos() * mscale) and torch.equal(sin, emb.sin() * mscale)
    # transformers' save_pretrained layout (rope_parameters) reads the same.
    assert all(torch.equal(a, b) for a, b in zip(rotary_embedding(hf.to_dict(), positions), (cos, sin)))
    # Without the published mscales: sqrt(1 + ln(ctx / orig) / ln(orig)), as transformers derives it.
    scaling = {k: v for k, v in CONFIG["rope_scaling"].items() if "mscale" not in k}
    plain_cos, _ = rotary_embedding({**CONFIG, "rope_scaling": scaling}, positions)
    torch.testing.assert_close(plain_cos, emb.cos() * (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(64.0))).sqrt())


@pytest.mark.parametrize("seq", [SHORT, LONG])
def test_logits_match_transformers(seq):
    model = _hf_model()
    if seq > ORIGINAL:
        with_long_factors(model)
    ids = _ids(seq)
    with torch.no_grad():
        expected = model(ids).logits
    got = our_logits(CONFIG, published_tensors(model.state_dict()), ids)
    err = (got - expected).abs().max().item()
    print(f"seq {seq}: max |logit error| {err:.2e}")
    assert err <= 1e-5


def test_transformers_keeps_short_factors():
    """transformers 5.23 past the original context: short factors with long_mscale. If this fails,
    transformers now applies the long factors and ``with_long_factors`` can go."""
    model = _hf_model()
    ids = _ids(LONG)
    with torch.no_grad():
        plain = model(ids).logits
        fixed = with_long_factors(model)(ids).logits
    assert (plain - fixed).abs().max() > 1e-2
    assert (our_logits(CONFIG, published_tensors(model.state_dict()), ids) - fixed).abs().max() <= 1e-5


def test_expert_hooks_see_exactly_the_routed_tokens():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    model = _hf_model()
    tensors = published_tensors(model.state_dict())
    layers = load_layers(CONFIG, tensors)
    block = layers[1].block_sparse_moe
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(CONFIG["num_local_experts"])}
    moe_input = []
    hooks = [block.register_forward_hook(lambda m, args, out: moe_input.append(args[0].reshape(-1, args[0].shape[-1])))]
    for e, expert in enumerate(block.experts):
        hooks.append(expert.w1.register_forward_hook(lambda m, args, out, e=e: seen[e].append(args[0])))
    ids = _ids(SHORT)
    our_logits(CONFIG, tensors, ids, layers)
    for hook in hooks:
        hook.remove()
    x = moe_input[0]
    _, chosen = sparsemixer(block.gate(x), jitter_eps=CONFIG["router_jitter_noise"], training=False)
    counts = []
    for e, inputs in seen.items():
        routed = (chosen == e).any(-1)
        captured = torch.cat(inputs) if inputs else x[:0]
        assert captured.shape[0] == int((chosen == e).sum())  # one row per (token, top-2 slot) sent to e
        assert torch.equal(captured, x[routed])
        counts.append(captured.shape[0])
    assert sum(counts) == 2 * x.shape[0] and sum(c > 0 for c in counts) >= 2


def _plain_softmax_top2(renormalise: bool):
    def routing(logits):
        weights, experts = torch.softmax(logits, -1).topk(2, dim=-1)
        return (weights / weights.sum(-1, keepdim=True) if renormalise else weights), experts

    return routing


def test_sparsemixer_is_not_plain_softmax_top2():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    model = _hf_model()
    with torch.no_grad():  # near-equal router rows: several experts fall inside sparsemixer's 2% band
        for layer in model.model.layers:
            w = layer.mlp.router.weight
            w.copy_(w[:1] + 0.01 * w)
    tensors = published_tensors(model.state_dict())
    ids = _ids(SHORT)
    with torch.no_grad():
        expected = model(ids).logits
    layers = load_layers(CONFIG, tensors)
    logits = layers[0].block_sparse_moe.gate(torch.randn(256, CONFIG["hidden_size"], generator=torch.Generator().manual_seed(1)))
    weights, chosen = sparsemixer_top2(logits, 0.01)
    hf_weights, hf_chosen = sparsemixer(logits, jitter_eps=0.01, training=False)
    assert torch.equal(weights, hf_weights) and torch.equal(chosen, hf_chosen)
    assert ((weights > 0.05) & (weights < 0.95)).any(-1).float().mean() > 0.2  # a real softmax inside the band
    plain, plain_chosen = _plain_softmax_top2(False)(logits)
    assert torch.equal(plain_chosen, chosen) and (plain - weights).abs().max() > 0.3

    assert (our_logits(CONFIG, tensors, ids, layers) - expected).abs().max() <= 1e-5
    for renormalise in (False, True):
        for layer in layers:
            layer.block_sparse_moe.routing = _plain_softmax_top2(renormalise)
        assert (our_logits(CONFIG, tensors, ids, layers) - expected).abs().max() > 1e-2


def test_phimoe_fixture(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, PhimoeForCausalLM

    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes import load_recipe

    make_fixture(load_recipe("phi-3.5-moe"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["PhiMoEForCausalLM"] and config["model_type"] == "phimoe"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 4
    assert (config["max_position_embeddings"], config["original_max_position_embeddings"]) == (131072, 4096)
    scaling = config["rope_scaling"]
    assert scaling["type"] == "longrope" and scaling["original_max_position_embeddings"] == 4096
    assert scaling["short_mscale"] == scaling["long_mscale"] == pytest.approx(1.243163121016122)
    assert len(scaling["short_factor"]) == len(scaling["long_factor"]) == config["hidden_size"] // config["num_attention_heads"] // 2
    assert "rope_parameters" not in config and config["phi3_export_fixture"]["recipe"] == "phi-3.5-moe"

    tensors = {name: t for file in tmp_path.glob("*.safetensors") for name, t in load_file(file).items()}
    expected_names = {"model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight", "lm_head.bias"}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected_names |= {f"{p}{n}.{kind}" for n in ("input_layernorm", "post_attention_layernorm") for kind in ("weight", "bias")}
        expected_names |= {f"{p}self_attn.{n}_proj.{kind}" for n in "qkvo" for kind in ("weight", "bias")}
        expected_names |= {f"{p}block_sparse_moe.gate.weight"}
        expected_names |= {f"{p}block_sparse_moe.experts.{e}.w{j}.weight" for e in range(4) for j in (1, 2, 3)}
    assert set(tensors) == expected_names
    assert tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"].shape == (config["intermediate_size"], config["hidden_size"])

    model, info = PhimoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("Explain rotary embeddings to a tiny mixture of experts.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    err = (our_logits(config, tensors, ids) - expected).abs().max().item()
    print(f"fixture: max |logit error| {err:.2e}")
    assert err <= 1e-5
