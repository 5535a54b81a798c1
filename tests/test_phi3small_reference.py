"""Phi-3-small's published semantics, each pinned on its own, and the fixture (arch/phi3small_layer.py, fixtures/phi3small.py).

There is no transformers class to compare with (the published model is remote code needing
triton): each fact is checked against a formula written out here independently — the
blocksparse pattern, GEGLU, the muP scales, the head-group-major qkv rows, the dense-layer
rule, the rotary scales — and the whole model against the plan-driven streamed path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from phi3_export.arch import phi3small_layer
from phi3_export.arch.blocksparse import BlockSparse
from phi3_export.arch.phi3small import PUBLISHED_DUMMY_IDS, Phi3Small, attention_scale
from phi3_export.arch.phi3small_layer import Phi3SmallAttention, Phi3SmallLayer, Phi3SmallModel, gegelu, rotary_embedding
from phi3_export.arch.rotary import torch_cos_sin
from phi3_export.fixtures.phi3small import randomize

# The fixture's shape (8 heads / 2 KV heads of 16 dims, blocks of 16, 3 local blocks, stride 4), small vocab.
CONFIG = {
    "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "hidden_size": 128, "num_attention_heads": 8,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 96, "ff_intermediate_size": 64, "gegelu_limit": 20.0,
    "blocksparse_block_size": 16, "blocksparse_num_local_blocks": 3, "blocksparse_vert_stride": 4,
    "blocksparse_homo_head_pattern": False, "dense_attention_every_n_layers": 2, "layer_norm_epsilon": 1e-5,
    "mup_use_scaling": True, "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0, "mup_width_multiplier": 8.0,
    "rope_embedding_base": 1e6, "rope_position_scale": 1.0, "rope_scaling": None, "max_position_embeddings": 8192,
    "dummy_token_indices": [90, 91, 92, 93, 94, 95],
}
LONG = {**CONFIG, "max_position_embeddings": 1024, "rope_scaling": {
    "type": "su", "short_factor": [1.0 + 0.01 * i for i in range(8)], "long_factor": [1.0 + 0.5 * i * i for i in range(8)],
    "original_max_position_embeddings": 64}}
SEQ = 100  # > 6 blocks of 16: past the 3-block local window, so the vertical stripes matter


def _model(config: dict = CONFIG, seed: int = 0) -> Phi3SmallModel:
    torch.manual_seed(seed)
    model = Phi3SmallModel(config).eval()
    randomize(model, seed)
    return model


def _ids(n: int = SEQ, vocab: int = 90, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- the blocksparse pattern ----------------------------------------------------------------

def formula_visible(heads: int, h: int, q: int, k: int, local: int, stride: int) -> bool:
    """Query block q of head h sees key block k (family-next.md), written out independently."""
    step = max(1, stride // heads)
    return q >= k and (q - k < local or (k + h * step + 1) % stride == 0)


PATTERNS = [BlockSparse(64, 16, 8), BlockSparse(16, 3, 4)]  # published, fixture


@pytest.mark.parametrize("pattern", PATTERNS, ids=["published", "fixture"])
@pytest.mark.parametrize("heads", [1, 2, 3, 8, 32])
def test_block_mask_matches_formula(pattern, heads):
    n = 40
    mask = pattern.block_mask(heads, n)
    want = np.array([[[formula_visible(heads, h, q, k, pattern.local_blocks, pattern.vert_stride) for k in range(n)]
                      for q in range(n)] for h in range(heads)])
    assert mask.shape == (heads, n, n) and (mask == want).all()
    # Token level: causal within the visible blocks.
    queries = np.array([0, 5, 17, 63, 200, 639])
    tokens = pattern.token_mask(heads, queries, 640)
    b = pattern.block
    for h in range(heads):
        for i, q in enumerate(queries):
            row = [k <= q and formula_visible(heads, h, q // b, k // b, pattern.local_blocks, pattern.vert_stride) for k in range(640)]
            assert (tokens[h, i] == np.array(row)).all()


@pytest.mark.parametrize(("pattern", "heads", "differs"), [
    (PATTERNS[0], 2, True), (PATTERNS[0], 3, True), (PATTERNS[1], 2, True),
    (PATTERNS[0], 1, False), (PATTERNS[0], 8, False), (PATTERNS[0], 32, False), (PATTERNS[1], 8, False),
])
def test_hard_coded_step_one_differs_for_few_heads(pattern, heads, differs):
    """Some ports use step 1 for every head count: a different model when heads < vert_stride (and > 1)."""
    n = 40
    step_one = np.array([[[q >= k and (q - k < pattern.local_blocks or (k + h + 1) % pattern.vert_stride == 0)
                           for k in range(n)] for q in range(n)] for h in range(heads)])
    assert bool((pattern.block_mask(heads, n) != step_one).any()) == differs


def test_fixture_heads_have_their_own_stripes():
    mask = PATTERNS[1].block_mask(8, 40)
    assert len({m.tobytes() for m in mask}) == 4  # stride 4: heads h and h + 4 share a pattern
    assert (mask[:4] == mask[4:]).all()


# ---- GEGLU ------------------------------------------------------------------------------------

def _quick_gelu(x: float) -> float:
    return x / (1 + math.exp(-1.702 * x))


@pytest.mark.parametrize(("gate", "linear", "want"), [
    (1.0, 0.5, _quick_gelu(1.0) * 1.5),          # quick_gelu (1.702), times (l + 1)
    (-0.7, 0.0, _quick_gelu(-0.7) * 1.0),          # l = 0 still passes the gate: the + 1
    (25.0, 3.0, _quick_gelu(20.0) * 4.0),          # gate clamped to <= 20
    (-25.0, 3.0, _quick_gelu(-25.0) * 4.0),        # ... but not from below
    (2.0, 30.0, _quick_gelu(2.0) * 21.0),          # linear clamped to <= 20
    (2.0, -30.0, _quick_gelu(2.0) * -19.0),        # ... and to >= -20
    (math.inf, 1.0, math.inf),                     # infinities pass unclamped
    (2.0, math.inf, math.inf),
    (2.0, -math.inf, -math.inf),
])
def test_gegelu_hand_picked_values(gate, linear, want):
    up = torch.tensor([[gate, linear, 0.0, 0.0]], dtype=torch.float64)  # even columns gate, odd columns linear
    got = gegelu(up, 20.0)
    assert got.shape == (1, 2) and float(got[0, 1]) == 0.0
    if math.isinf(want):
        assert float(got[0, 0]) == want
    else:
        assert float(got[0, 0]) == pytest.approx(want, rel=1e-12, abs=1e-300)
    if not math.isinf(gate) and not math.isinf(linear):  # no limit: nothing clamped
        assert float(gegelu(up, None)[0, 0]) == pytest.approx(_quick_gelu(gate) * (linear + 1), rel=1e-12, abs=1e-300)


def test_quick_gelu_is_not_erf_gelu():
    x = torch.tensor([1.0], dtype=torch.float64)
    assert float(gegelu(torch.tensor([[1.0, 0.0]], dtype=torch.float64), 20.0)[0, 0]) == pytest.approx(1 / (1 + math.exp(-1.702)))
    assert abs(float(torch.nn.functional.gelu(x)) - _quick_gelu(1.0)) > 1e-3


def test_mlp_gate_rows_are_the_plans_even_rows():
    layer = _model().model.layers[0]
    plan_mlp = Phi3Small.plan(CONFIG).decoder.layers[0].mlp
    gate_rows, linear_rows = plan_mlp.gate_up.rows("gate").indices(), plan_mlp.gate_up.rows("linear").indices()
    assert gate_rows == list(range(0, 128, 2)) and linear_rows == list(range(1, 128, 2))
    x = torch.randn(3, 128)
    w, b = layer.mlp.up_proj.weight, layer.mlp.up_proj.bias
    g, lin = x @ w[gate_rows].T + b[gate_rows], x @ w[linear_rows].T + b[linear_rows]
    want = layer.mlp.down_proj(_qg(g.clamp(max=20)) * (lin.clamp(-20, 20) + 1))
    torch.testing.assert_close(layer.mlp(x), want)


def _qg(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# ---- attention: scale, head-group-major qkv, masks ---------------------------------------------

def test_attention_scale_is_mup():
    assert attention_scale(CONFIG, 128) == 1 / 128
    assert attention_scale({**CONFIG, "mup_attn_multiplier": 2.0}, 16) == 2 / 16
    assert attention_scale({**CONFIG, "mup_use_scaling": False}, 128) == 1 / math.sqrt(128)
    assert Phi3SmallAttention(CONFIG, 0).scale == 1 / 16


def test_head_group_major_split_is_the_plans_rows():
    attn = Phi3SmallAttention(CONFIG, 0)
    rows = (8 + 2 * 2) * 16
    qkv = torch.arange(rows, dtype=torch.float32)[None, None]  # each output carries its row number
    q, k, v = attn.split_qkv(qkv)
    got = {"q": q[0, :, 0].flatten(), "k": k[0, :, 0].flatten(), "v": v[0, :, 0].flatten()}
    plan_qkv = Phi3Small.plan(CONFIG).decoder.layers[0].attention.qkv
    rep, hd = 4, 16
    for part in ("q", "k", "v"):
        assert got[part].long().tolist() == plan_qkv.rows(part).indices()
    # Written out: query head h = g * rep + j at group g's slot j; k at slot rep, v at slot rep + 1.
    for h in range(8):
        g, j = divmod(h, rep)
        assert got["q"][h * hd : (h + 1) * hd].long().tolist() == list(range((g * (rep + 2) + j) * hd, (g * (rep + 2) + j + 1) * hd))
    for g in range(2):
        assert got["k"][g * hd].item() == (g * (rep + 2) + rep) * hd and got["v"][g * hd].item() == (g * (rep + 2) + rep + 1) * hd


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def naive_attention(attn: Phi3SmallAttention, x: torch.Tensor, config: dict, scale: float, blocksparse: bool) -> torch.Tensor:
    """Head by head, with the mask from formula_visible: [s, hidden] -> [s, hidden]."""
    heads, kv, hd = 8, 2, 16
    rep, s = heads // kv, x.shape[0]
    out = x @ attn.query_key_value.weight.T + attn.query_key_value.bias
    cos, sin = (t[0] for t in rotary_embedding(config, torch.arange(s)))
    b = config["blocksparse_block_size"]
    heads_out = []
    for h in range(heads):
        g, j = divmod(h, rep)
        base = g * (rep + 2) * hd
        q = _rot(out[:, base + j * hd : base + (j + 1) * hd], cos, sin)
        k = _rot(out[:, base + rep * hd : base + (rep + 1) * hd], cos, sin)
        v = out[:, base + (rep + 1) * hd : base + (rep + 2) * hd]
        visible = torch.tensor([[kk <= qq and (not blocksparse or formula_visible(
            heads, h, qq // b, kk // b, config["blocksparse_num_local_blocks"], config["blocksparse_vert_stride"]))
            for kk in range(s)] for qq in range(s)])
        scores = (q @ k.T * scale).masked_fill(~visible, -math.inf)
        heads_out.append(torch.softmax(scores, -1) @ v)
    return attn.dense(torch.cat(heads_out, -1))


@pytest.mark.parametrize("index", [0, 1], ids=["blocksparse", "dense"])
def test_attention_against_head_by_head_formula(index):
    layer = _model().model.layers[index]
    attn = layer.self_attn
    assert (attn.blocksparse is None) == (index == 1)
    x = torch.randn(1, SEQ, 128, generator=torch.Generator().manual_seed(3))
    pe = rotary_embedding(CONFIG, torch.arange(SEQ))
    with torch.no_grad():
        got = attn(x, pe)[0]
        torch.testing.assert_close(got, naive_attention(attn, x[0], CONFIG, 1 / 16, index == 0), atol=2e-5, rtol=1e-4)
        # 1/sqrt(head_dim) would be another model; and the stripes matter at this length.
        assert (got - naive_attention(attn, x[0], CONFIG, 1 / 4, index == 0)).abs().max() > 1e-3
        if index == 0:
            assert (got - naive_attention(attn, x[0], CONFIG, 1 / 16, False)).abs().max() > 1e-3
        # An explicit causal mask (what calibration passes) gives the same as None.
        mask = Phi3Small.calibration_inputs(CONFIG, SEQ)["attention_mask"]
        torch.testing.assert_close(attn(x, pe, mask)[0], got)


def test_attention_in_query_chunks_is_the_same(monkeypatch):
    attn = _model().model.layers[0].self_attn
    x = torch.randn(2, SEQ, 128, generator=torch.Generator().manual_seed(4))
    pe = rotary_embedding(CONFIG, torch.arange(SEQ))
    with torch.no_grad():
        whole = attn(x, pe)
        monkeypatch.setattr(phi3small_layer, "SCORE_ELEMENTS", 2 * 8 * SEQ * 7)  # 7 query rows at a time
        torch.testing.assert_close(attn(x, pe), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("layers", "every", "dense"), [(6, 2, {1, 3, 5}), (6, 3, {2, 5}), (4, 1, {0, 1, 2, 3}), (3, 4, set())])
def test_dense_layers_where_i_plus_1_divides(layers, every, dense):
    config = {**CONFIG, "num_hidden_layers": layers, "dense_attention_every_n_layers": every}
    plan = Phi3Small.plan(config)
    assert {i for i in range(layers) if Phi3SmallLayer(config, i).self_attn.blocksparse is None} == dense
    assert {layer.index for layer in plan.decoder.layers if layer.attention.kind == "dense"} == dense


# ---- rotary -----------------------------------------------------------------------------------

def test_rotary_base_is_rope_embedding_base():
    cos, sin = rotary_embedding({**CONFIG, "rope_theta": 10000.0}, torch.arange(5))
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 16, 2).float() / 16))
    angles = torch.arange(5).float()[:, None] * inv_freq
    torch.testing.assert_close(cos[0], torch.cat([angles.cos()] * 2, -1))
    torch.testing.assert_close(sin[0], torch.cat([angles.sin()] * 2, -1))


@pytest.mark.parametrize("config", [{**CONFIG, "rope_theta": 10000.0}, {k: v for k, v in CONFIG.items() if k != "rope_embedding_base"}],
                         ids=["with-rope-theta", "without-base"])
def test_plan_rotary_base_is_rope_embedding_base(config):
    assert Phi3Small.plan(config).decoder.rotary.theta == 1e6


def test_rotary_short_scale_one_long_scale_from_ratio():
    short_cos, _ = rotary_embedding(LONG, torch.arange(64))  # fits the original 64: short factors, scale 1.0
    inv = 1.0 / (torch.tensor(LONG["rope_scaling"]["short_factor"]) * 1e6 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(short_cos[0, :, :8], (torch.arange(64).float()[:, None] * inv).cos())
    long_cos, _ = rotary_embedding(LONG, torch.arange(65))  # one past: every position on the long factors
    mscale = math.sqrt(1 + math.log(1024 / 64) / math.log(64))
    inv = 1.0 / (torch.tensor(LONG["rope_scaling"]["long_factor"]) * 1e6 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(long_cos[0, :, :8], (torch.arange(65).float()[:, None] * inv).cos() * mscale)
    rotary = Phi3Small.plan(LONG).decoder.rotary
    assert rotary.short_scale == 1.0 and rotary.long_scale == pytest.approx(mscale)
    for n in (64, 65):  # the plan's tables (what the exporters embed) are the reference's
        for got, want in zip(rotary_embedding(LONG, torch.arange(n)), torch_cos_sin(rotary, n)):
            torch.testing.assert_close(got, want)
    published = {**LONG, "rope_scaling": {**LONG["rope_scaling"], "short_mscale": 1.1, "long_mscale": 1.3}}
    assert float(rotary_embedding(published, torch.arange(1))[0][0, 0, 0]) == pytest.approx(1.1)
    assert float(rotary_embedding(published, torch.arange(65))[0][0, 0, 0]) == pytest.approx(1.3)


def test_long_factors_apply_to_every_position_once_past_the_original():
    model = _model(LONG)
    ids = _ids(80)
    with torch.no_grad():
        prefix, whole = model(ids[:, :60]), model(ids)
    assert (whole[:, :60] - prefix).abs().max() > 1e-3


# ---- the model: muP scales, dummy ids, streamed path -------------------------------------------

def test_embedding_times_ten_logits_over_eight_and_dummy_ids():
    model = _model()
    ids = _ids(40)
    seen = {}
    model.model.layers[0].register_forward_hook(lambda m, args, kwargs, out: seen.setdefault("x", args[0]), with_kwargs=True)
    model.model.final_layernorm.register_forward_hook(lambda m, args, out: seen.setdefault("h", out))
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(seen["x"], model.model.embed_tokens(ids) * 10.0)
        want = seen["h"] @ model.model.embed_tokens.weight.T / 8.0  # tied: the table is the LM head
    dummy = CONFIG["dummy_token_indices"]
    real = [i for i in range(96) if i not in dummy]
    torch.testing.assert_close(logits[..., real], want[..., real])
    assert logits.dtype == torch.float32 and (logits[..., dummy] == torch.finfo(torch.float32).min).all()
    assert torch.isfinite(logits).all() and "lm_head.weight" not in model.state_dict()
    untied = Phi3SmallModel({**CONFIG, "tie_word_embeddings": False})
    assert untied.state_dict()["lm_head.weight"].shape == (96, 128)


def test_dummy_ids_default_to_the_published_list():
    config = {k: v for k, v in CONFIG.items() if k != "dummy_token_indices"}
    assert Phi3Small.plan({**config, "vocab_size": 100352}).decoder.masked_ids == PUBLISHED_DUMMY_IDS
    assert len(PUBLISHED_DUMMY_IDS) == 6 + 85 and 100257 not in PUBLISHED_DUMMY_IDS and 100266 not in PUBLISHED_DUMMY_IDS


@pytest.mark.parametrize("config", [CONFIG, LONG], ids=["8k", "128k"])
def test_model_equals_streamed_layers(config):
    """What validate does: the plan's embedding, layers as calibration modules with calibration_inputs, final norm, head."""
    model = _model(config)
    plan, state = Phi3Small.plan(config), model.state_dict()
    ids = torch.cat([_ids(SEQ, seed=5), _ids(SEQ, seed=6)])
    decoder = plan.decoder
    with torch.no_grad():
        want = model(ids)
        extra = Phi3Small.calibration_inputs(config, SEQ)
        x = state[decoder.embedding][ids] * decoder.embedding_scale
        for layer in decoder.layers:
            module = Phi3Small.loaded_layer(config, layer, {name: state[name] for name in layer.tensors()})
            x = module(x, **extra)
        norm = decoder.final_norm
        x = torch.nn.functional.layer_norm(x, (128,), state[norm.weight], state[norm.bias], norm.eps)
        got = (x @ state[decoder.lm_head.weight].T * decoder.logits_scale).masked_fill(
            torch.isin(torch.arange(96), torch.tensor(decoder.masked_ids)), torch.finfo(torch.float32).min)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A model attending densely everywhere is another model at this length.
    dense = Phi3SmallModel({**config, "dense_attention_every_n_layers": 1})
    dense.load_state_dict(state)
    with torch.no_grad():
        assert (dense(ids) - want).abs().max() > 1e-3


# ---- the fixture --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["phi-3-small-8k", "phi-3-small-128k"])
def small_fixture(request, tmp_path_factory):
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes.loader import load_recipe

    out = tmp_path_factory.mktemp(request.param)
    make_fixture(load_recipe(request.param), out)
    return request.param, out


def _fixture_model(folder) -> tuple[Phi3SmallModel, dict]:
    from phi3_export.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(folder)
    model = Phi3SmallModel(ckpt.config).eval()
    model.load_state_dict({name: ckpt.tensor(name) for name in ckpt.names})  # strict: exactly the published names
    return model, ckpt.config


def test_fixture_is_a_phi3_small_checkpoint(small_fixture):
    from phi3_export.checkpoint.check import check_tensors, checked_architecture
    from phi3_export.checkpoint.reader import Checkpoint
    from phi3_export.checkpoint.tiktoken import CL100K_PATTERN
    from phi3_export.fixtures.tokenizer import load_tokenizer

    recipe, folder = small_fixture
    ckpt = Checkpoint(folder)
    assert checked_architecture(ckpt) is Phi3Small and ckpt.tokenizer_kind == "byte-bpe"
    plan = Phi3Small.plan(ckpt.config)
    check_tensors(ckpt, plan)
    config = ckpt.config
    assert "tie_word_embeddings" not in config and "lm_head.weight" not in ckpt and plan.decoder.tied
    assert config["model_type"] == "phi3small" and config["hidden_act"] == "gegelu" and config["ff_intermediate_size"] > 0
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"] // 8 % 16) == (8, 2, 0)
    assert [layer.attention.kind for layer in plan.decoder.layers] == ["blocksparse", "dense"]
    tokenizer = load_tokenizer(folder)
    used = set(tokenizer.get_vocab().values())
    assert config["dummy_token_indices"] == [i for i in range(config["vocab_size"]) if i not in used]
    assert len(config["dummy_token_indices"]) >= 8 and min(config["dummy_token_indices"]) == len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert config["bos_token_id"] == config["eos_token_id"] == eos
    spec = json.loads((folder / "tokenizer.json").read_text())
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == CL100K_PATTERN and byte_level["type"] == "ByteLevel" and not byte_level["use_regex"]
    assert {t["content"] for t in spec["added_tokens"]} == {"<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\n"  # the published template starts with bos
    if recipe.endswith("128k"):
        assert config["max_position_embeddings"] == 131072 and config["rope_scaling"]["type"] == "su"
        assert config["rope_scaling"]["original_max_position_embeddings"] == 8192 and len(config["rope_scaling"]["long_factor"]) == 8
    else:
        assert config["max_position_embeddings"] == 8192 and config["rope_scaling"] is None
    model, _ = _fixture_model(folder)
    with torch.no_grad():
        logits = model(_ids(50, vocab=len(tokenizer)))
    assert 0.1 < float(logits[..., : len(tokenizer)].std(-1).mean()) < 5  # random weights: logits neither flat nor peaked


def test_fixture_trains(fixture_dir):
    from phi3_export.fixtures.phi3small import _Trainable
    from phi3_export.fixtures.tiny import _train, training_text
    from phi3_export.fixtures.tokenizer import load_tokenizer

    folder = fixture_dir("phi-3-small-8k")  # one recipe is enough: the training path is the same
    model, _ = _fixture_model(folder)
    tokenizer = load_tokenizer(folder)
    ids = torch.tensor(tokenizer(training_text(tokenizer)).input_ids[:4 * 128]).view(4, 128)
    trainable = _Trainable(model)
    with torch.no_grad():
        before = float(trainable(input_ids=ids, labels=ids).loss)
    _train(trainable, tokenizer, 40, seed=0, seq_len=64, batch=4)  # a few seconds
    with torch.no_grad():
        after = float(trainable(input_ids=ids, labels=ids).loss)
    assert after < before - 0.5, (before, after)  # from uniform (ln 1024 = 6.9) towards the text's statistics
