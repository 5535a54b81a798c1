"""Phi-3-vision: HD transform (vs onnxruntime-genai 0.18's own processor), the torch reference of the
image embedding (each published fact pinned), the tiny fixtures and their checkpoint checks."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from phi3_export.arch import architecture
from phi3_export.arch.hd_transform import CLIP_STD, hd_size, hd_transform, image_tokens
from phi3_export.arch.phi3v_image import ImageEmbeddingReference, arrange, clip_vision_model, merge_patches
from phi3_export.checkpoint.check import check_recipe, check_tensors, checked_architecture, expected_tensors
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes import load_recipe

PIXEL_LEVEL = 1 / 255 / min(CLIP_STD)  # one 8-bit level after normalisation (0.0146)


def formula(h: int, w: int) -> int:
    return (h // 336 * (w // 336) + 1) * 144 + 1 + (h // 336 + 1) * 12


# (W, H) -> HD [H, W] and tokens at 16 crops, as onnxruntime-genai 0.18 measured them (notes/phi3v-study.md §4),
# and at 4 crops, by the published algorithm.
SIZES_16 = {(700, 500): ([1008, 1344], 1921), (500, 500): ([1344, 1344], 2509), (336, 336): ([1344, 1344], 2509),
            (20, 20): ([1344, 1344], 2509), (1200, 300): ([672, 2688], 2485), (300, 1200): ([2688, 672], 2557),
            (2000, 1500): ([1008, 1344], 1921), (1008, 1344): ([1344, 1008], 1933), (3000, 100): ([336, 5376], 2473),
            (10, 4000): ([5376, 336], 2653)}
SIZES_4 = {(700, 500): ([672, 672], 757), (1200, 300): ([336, 1344], 745), (300, 1200): ([1344, 336], 781)}


@pytest.fixture(scope="module")
def vision_fixture(fixture_dir) -> Path:
    return fixture_dir("phi-3-vision-128k")


@pytest.fixture(scope="module")
def plan(vision_fixture):
    ckpt = Checkpoint(vision_fixture)
    return checked_architecture(ckpt).plan(ckpt.config)


@pytest.fixture(scope="module")
def tensors(vision_fixture, plan) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(vision_fixture)
    return {name: ckpt.tensor(name) for name in ckpt.names}


@pytest.fixture(scope="module")
def reference(plan, tensors) -> ImageEmbeddingReference:
    return ImageEmbeddingReference(plan.image, tensors)


def _image(width: int, height: int, seed: int, kind: str = "smooth"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.BICUBIC)


# ---- HD transform ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(SIZES_16))
def test_hd_size_and_tokens_at_16_crops(size, plan):
    hd, tokens = SIZES_16[size]
    *_, w, h = hd_size(*size, 16)
    assert [h, w] == hd
    assert image_tokens(plan.image, h, w) == formula(h, w) == tokens


@pytest.mark.parametrize("size", sorted(SIZES_4))
def test_hd_size_and_tokens_at_4_crops(size, plan):
    hd, tokens = SIZES_4[size]
    *_, w, h = hd_size(*size, 4)
    assert [h, w] == hd and image_tokens(plan.image, h, w) == tokens
    # wide and tall images of one crop count differ: separators close the rows of the sub grid only
    assert image_tokens(plan.image, 336, 1344) != image_tokens(plan.image, 1344, 336)


def test_hd_transform_layout_any_crop_count():
    images = [_image(700, 500, 0), _image(300, 1200, 1), _image(10, 4000, 2)]
    pv, sizes = hd_transform(images, 4)
    assert pv.shape == (3, 5, 3, 336, 336) and pv.dtype == np.float32
    assert sizes.dtype == np.int64 and sizes.tolist() == [[672, 672], [1344, 336], [1344, 336]]
    for i, (h, w) in enumerate(sizes.tolist()):
        used = 1 + (h // 336) * (w // 336)
        assert np.abs(pv[i, :used]).reshape(used, -1).max(axis=1).min() > 0
        assert not pv[i, used:].any()  # zero slots after the real crops
    # 10 x 4000 resizes to 3 x 1344, padded white (1.0 before normalisation) left and right, centred
    white = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073], np.float32)) / np.array(CLIP_STD, np.float32)
    for column in (0, 165, 169, 335):
        np.testing.assert_allclose(pv[2, 1, :, 100, column], white, atol=1e-6)
    assert not np.allclose(pv[2, 1:5, :, :, 166:169], white[:, None, None], atol=1e-3)
    assert hd_size(10, 4000, 1)[:2] == (1, 336)  # the published code would resize to 0 pixels wide


def _processor_artifact(out: Path, num_crops: int = 16) -> Path:
    """A phi3v artifact of trivial graphs whose only use is ``create_multimodal_processor``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from phi3_export.fixtures.corpus import corpus_text
    from phi3_export.fixtures.tokenizer import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer("llama-sentencepiece", corpus_text("train"), 300, out)
    hidden, vocab, vi = 8, 1024, helper.make_tensor_value_info

    def save(node, name, inputs, outputs, inits):
        model = helper.make_model(helper.make_graph([node], name, inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(out / f"{name}.onnx"))

    def zeros(name, shape):
        return [numpy_helper.from_array(np.zeros(shape, np.float32), name)]

    save(helper.make_node("MatMul", ["inputs_embeds", "w"], ["logits"]), "model",
         [vi("inputs_embeds", TensorProto.FLOAT, ["b", "s", hidden]), vi("attention_mask", TensorProto.INT64, ["b", "t"])],
         [vi("logits", TensorProto.FLOAT, ["b", "s", vocab])], zeros("w", (hidden, vocab)))
    save(helper.make_node("Gather", ["w", "input_ids"], ["inputs_embeds"]), "embedding",
         [vi("input_ids", TensorProto.INT64, ["b", "s"]), vi("image_features", TensorProto.FLOAT, ["t", hidden])],
         [vi("inputs_embeds", TensorProto.FLOAT, ["b", "s", hidden])], zeros("w", (vocab, hidden)))
    save(helper.make_node("Identity", ["image_sizes"], ["image_features"]), "vision",
         [vi("pixel_values", TensorProto.FLOAT, ["n", "c", 3, 336, 336]), vi("image_sizes", TensorProto.INT64, ["n", 2])],
         [vi("image_features", TensorProto.INT64, ["n", 2])], [])
    kv = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    model = {
        "type": "phi3v", "bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2, "context_length": 16384, "vocab_size": vocab,
        "decoder": {"filename": "model.onnx", "head_size": hidden, "hidden_size": hidden, "num_attention_heads": 1,
                    "num_hidden_layers": 0, "num_key_value_heads": 1,
                    "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask", **kv},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}},
        "embedding": {"filename": "embedding.onnx", "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
        "vision": {"filename": "vision.onnx", "config_filename": "processor_config.json",
                   "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
                   "outputs": {"image_features": "image_features"}}}
    search = {"max_length": 16384, "do_sample": False, "num_beams": 1, "past_present_share_buffer": False}
    (out / "genai_config.json").write_text(json.dumps({"model": model, "search": search}))
    ext = "com.microsoft.extensions"
    transforms = [{"name": "decode_image", "domain": ext, "type": "DecodeImage", "attrs": {"color_space": "BGR"}},
                  {"name": "convert_to_rgb", "domain": ext, "type": "ConvertRGB"},
                  {"name": "phi3_image_transform", "domain": ext, "type": "Phi3ImageTransform",
                   "attrs": {"num_crops": num_crops, "num_img_tokens": 144}}]
    processor = {"processor": {"name": "image_processing", "transforms": [{"operation": t} for t in transforms]}}
    (out / "processor_config.json").write_text(json.dumps(processor))
    return out


RUNTIME_IMAGES = {"square": (500, 500), "wide": (1200, 300), "tall": (300, 1200), "tiny": (20, 20),
                  "large": (2000, 1500), "tall-odd": (333, 901)}


def test_hd_transform_equals_runtime_processor(tmp_path, plan):
    import onnxruntime_genai as og
    processor = og.Model(str(_processor_artifact(tmp_path / "art"))).create_multimodal_processor()
    for i, (name, (width, height)) in enumerate(RUNTIME_IMAGES.items()):
        for kind in ("smooth", "noise"):
            image = _image(width, height, i, kind)
            png = io.BytesIO()
            image.save(png, format="PNG")
            got = processor("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", images=og.Images.open_bytes(png.getvalue()))
            pv_rt, sizes_rt = got["pixel_values"].as_numpy(), got["image_sizes"].as_numpy()
            pv, sizes = hd_transform([image], 16)
            label = f"{name} {width}x{height} {kind}"
            assert sizes.tolist() == sizes_rt.tolist(), label
            assert pv.shape == pv_rt.shape == (1, 17, 3, 336, 336), label
            # Measured: sub-crops bit-equal, the global image within 1.2e-6; the bound is one pixel level.
            assert np.abs(pv[0, 1:] - pv_rt[0, 1:]).max() <= PIXEL_LEVEL, label
            assert np.abs(pv[0, 0] - pv_rt[0, 0]).max() <= PIXEL_LEVEL / 4, label
            h, w = sizes[0].tolist()
            tokens = image_tokens(plan.image, h, w)
            assert int(got["num_image_tokens"].as_numpy()[0, 0]) == tokens == formula(h, w), label
            assert int((got["input_ids"].as_numpy() == -1).sum()) == tokens, label


# ---- the image embedding's published facts ---------------------------------------------------

def test_merge_channel_order():
    grid, c = 24, 3
    x = torch.arange(grid * grid * c, dtype=torch.float32).reshape(1, grid * grid, c)  # patch p channel k = p * c + k
    merged = merge_patches(x, 2)
    assert merged.shape == (1, 144, 4 * c)
    for token in (0, 1, 13, 143):
        tr, tc = divmod(token, 12)
        for block, (dr, dc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # [(r0,c0), (r0,c1), (r1,c0), (r1,c1)] x C
            patch = (2 * tr + dr) * grid + 2 * tc + dc
            assert merged[0, token, block * c : (block + 1) * c].tolist() == x[0, patch].tolist()


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (3, 2), (1, 4), (4, 4)])
def test_arrangement_separators_and_order(rows, cols):
    """[sub grid rows each closed by sub_GN, glb_GN, global rows each closed by sub_GN], by plain loops."""
    side, d = 12, 2
    crops = 1 + rows * cols
    merged = torch.stack([torch.tensor([[float(k), float(t)] for t in range(side * side)]) for k in range(crops)])
    sub_gn, glb_gn = torch.full((1, 1, 1, d), -1.0), torch.full((1, 1, d), -2.0)
    expected = []
    for r in range(rows * side):
        for col in range(cols * side):
            crop = 1 + (r // side) * cols + col // side  # sub-crops row-major, after the global one
            expected.append([crop, (r % side) * side + col % side])
        expected.append([-1.0, -1.0])
    expected.append([-2.0, -2.0])
    for r in range(side):
        expected.extend([[0, r * side + col] for col in range(side)])
        expected.append([-1.0, -1.0])
    got = arrange(merged, rows, cols, sub_gn, glb_gn)
    assert got.tolist() == expected
    assert len(expected) == formula(rows * 336, cols * 336)


def _published_features(plan, tensors, pixel_values, image_sizes) -> torch.Tensor:
    """The published algorithm (study §2), written out: a full CLIP tower, hidden_states[-2]."""
    full = clip_vision_model(plan.image, tensors, layers=len(plan.image.encoder.layers) + 1)
    prefix = "model.vision_embed_tokens."
    out = []
    for i, (h, w) in enumerate(image_sizes.tolist()):
        rows, cols = h // 336, w // 336
        hidden = full(pixel_values=pixel_values[i], output_hidden_states=True).hidden_states[-2][:, 1:]
        c = hidden.shape[-1]
        x = hidden.reshape(-1, 12, 2, 12, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 12, 12, 4 * c)
        glb = torch.cat([x[0], tensors[prefix + "sub_GN"].reshape(1, 1, 4 * c).expand(12, 1, 4 * c)], dim=1).reshape(-1, 4 * c)
        sub = x[1 : 1 + rows * cols].reshape(rows, cols, 12, 12, 4 * c).permute(0, 2, 1, 3, 4).reshape(rows * 12, cols * 12, 4 * c)
        sub = torch.cat([sub, tensors[prefix + "sub_GN"].reshape(1, 1, 4 * c).expand(rows * 12, 1, 4 * c)], dim=1).reshape(-1, 4 * c)
        out.append(torch.cat([sub, tensors[prefix + "glb_GN"].reshape(1, 4 * c), glb]))
    x = torch.cat(out)
    x = torch.nn.functional.linear(x, tensors[prefix + "img_projection.0.weight"], tensors[prefix + "img_projection.0.bias"])
    x = torch.nn.functional.gelu(x)
    return torch.nn.functional.linear(x, tensors[prefix + "img_projection.2.weight"], tensors[prefix + "img_projection.2.bias"])


def test_reference_equals_published_algorithm_and_reads_hidden_states_minus_2(plan, tensors, reference):
    assert len(plan.image.encoder.layers) == 2  # the fixture's tower has 3 layers: [-2] reads 2
    pv, sizes = hd_transform([_image(700, 500, 3), _image(300, 1200, 4)], 4)
    pv = torch.from_numpy(pv)
    got = reference(pv, sizes)
    tokens = [formula(h, w) for h, w in sizes.tolist()]
    assert got.shape == (sum(tokens), plan.decoder.hidden)
    want = _published_features(plan, tensors, pv, torch.from_numpy(sizes))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Another layer gives other features: the read is pinned to hidden_states[-2].
    last = ImageEmbeddingReference(plan.image, tensors)
    last.clip = clip_vision_model(plan.image, tensors, layers=3)
    last.feature_layer = 3
    assert (last(pv, sizes) - got).abs().max() > 0.1 * got.abs().max()
    # Features are not degenerate: a spread like the text embedding rows', images differ.
    table = tensors["model.embed_tokens.weight"]
    assert 0.3 < float(got.std() / table.std()) < 3
    assert (got[: tokens[0]].mean(0) - got[tokens[0] :].mean(0)).abs().max() > 1e-3


@pytest.mark.parametrize("hw", [(336, 336), (336, 1344), (1344, 336), (672, 1008), (1344, 1344)])
def test_token_count_of_reference(hw, plan, reference):
    h, w = hw
    crops = 1 + (h // 336) * (w // 336)
    pv = torch.randn(1, crops, 3, 336, 336, generator=torch.Generator().manual_seed(h * 7 + w))
    assert reference(pv, torch.tensor([[h, w]])).shape[0] == image_tokens(plan.image, h, w) == formula(h, w)


def test_zero_slots_are_not_read(reference):
    pv = torch.randn(1, 17, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    sizes = torch.tensor([[672, 336]])
    a = reference(pv, sizes)
    pv[0, 3:] = 0
    assert torch.equal(reference(pv, sizes), a)
    with pytest.raises(ValueError, match="needs 17 crops"):
        reference(pv[:, :5], torch.tensor([[1344, 1344]]))


def test_embed_places_features_in_order(plan):
    table = torch.randn(50, plan.decoder.hidden)
    features = torch.randn(7, plan.decoder.hidden)
    ids = torch.tensor([[3, -1, -1, -1, 9, -2, -2, -2, -2, 4]])
    out = ImageEmbeddingReference.embed(ids, features, table)
    assert out.shape == (1, 10, plan.decoder.hidden)
    torch.testing.assert_close(out[0, [1, 2, 3, 5, 6, 7, 8]], features)
    torch.testing.assert_close(out[0, [0, 4, 9]], table[[3, 9, 4]])
    with pytest.raises(ValueError, match="7 image placeholder ids but 6"):
        ImageEmbeddingReference.embed(ids, features[:6], table)


# ---- fixtures and checkpoint checks ----------------------------------------------------------

@pytest.mark.parametrize("recipe,crops", [("phi-3-vision-128k", 16), ("phi-3.5-vision", 4)])
def test_fixture_checkpoint(recipe, crops, fixture_dir):
    folder = fixture_dir(recipe)
    ckpt = Checkpoint(folder)
    arch = checked_architecture(ckpt)
    plan = arch.plan(ckpt.config)
    check_tensors(ckpt, plan)
    check_recipe(load_recipe(recipe), arch.facts_from_config(ckpt.config, ckpt.tokenizer_kind), is_fixture_of_recipe=True,
                 source=str(folder))
    config = ckpt.config
    assert config["architectures"] == ["Phi3VForCausalLM"] and config["model_type"] == "phi3_v"
    assert config["embd_layer"]["hd_transform_order"] == "sub_glb" and config["img_processor"]["num_img_tokens"] == 144
    assert config["img_processor"]["clip"]["num_hidden_layers"] == 3
    assert json.loads((folder / "preprocessor_config.json").read_text())["num_crops"] == crops
    expected = expected_tensors(plan)
    assert set(plan.image.tensors()) <= set(expected)
    # written as published, and never read: the tower's last layer and post_layernorm
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.2.mlp.fc1.weight" in ckpt.names
    assert "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight" in ckpt.names
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # as validate loads it: config.json has auto_map
    text = tok.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is this?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"


def test_fixture_decoder_is_the_phi3_fixtures(fixture_dir):
    vision, mini = Checkpoint(fixture_dir("phi-3-vision-128k")), Checkpoint(fixture_dir("phi-3-mini-128k"))
    text = [n for n in mini.names]
    assert text and all(n in vision.names for n in text)
    for name in text:
        assert torch.equal(vision.tensor(name), mini.tensor(name)), name


def test_check_tensors_knows_image_shapes(tmp_path, vision_fixture):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(vision_fixture, tmp_path / "ck")
    shard = tmp_path / "ck" / "model.safetensors"
    state = load_file(shard)
    name = "model.vision_embed_tokens.sub_GN"
    state[name] = torch.zeros(1, 1, 1, 8)
    save_file(state, shard, metadata={"format": "pt"})
    ckpt = Checkpoint(tmp_path / "ck")
    with pytest.raises(Phi3ExportError, match=r"'model.vision_embed_tokens.sub_GN' has shape \[1, 1, 1, 8\].*\[1, 1, 1, 256\]"):
        check_tensors(ckpt, checked_architecture(ckpt).plan(ckpt.config))
    state[name] = torch.zeros(1, 1, 1, 256)
    state["model.vision_embed_tokens.img_processor.vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(2, 2)
    save_file(state, shard, metadata={"format": "pt"})
    ckpt = Checkpoint(tmp_path / "ck")
    with pytest.raises(Phi3ExportError, match="layers.9.mlp.fc1.weight' .*is not part of the model"):
        check_tensors(ckpt, checked_architecture(ckpt).plan(ckpt.config))


def test_full_size_parameter_count():
    from phi3_export.fixtures.full_size import full_size_config, parameter_count

    vision = load_recipe("phi-3-vision-128k")
    config = full_size_config(vision)
    assert "clip" not in config["img_processor"]  # the published blocks: CLIP ViT-L/14-336 by default
    image = architecture("Phi3VForCausalLM").plan(config).image
    assert (image.encoder.hidden, image.encoder.heads, len(image.encoder.layers), image.merged_width) == (1024, 16, 23, 4096)
    d, inter, text = 1024, 4096, 3072
    layer = 4 * (d * d + d) + 2 * 2 * d + (inter * d + inter) + (d * inter + d)
    tower = d + d * 3 * 14 * 14 + 577 * d + 2 * d + 23 * layer
    head = 2 * 4 * d + (text * 4 * d + text) + (text * text + text)
    assert parameter_count(vision) == parameter_count(load_recipe("phi-3-mini-128k")) + tower + head
    assert math.isclose(parameter_count(vision) / 1e9, 4.13, abs_tol=0.01)


@pytest.mark.parametrize("block,key,value,message", [
    ("embd_layer", "hd_transform_order", "glb_sub", "embd_layer.hd_transform_order: 'glb_sub' is not supported"),
    ("img_processor", "type_feature", "cls_patch", "img_processor.type_feature: 'cls_patch' is not supported"),
    ("img_processor", "image_dim_out", 32, "img_processor.image_dim_out: 32 is not the image tower's width 64"),
    ("img_processor", "clip", {"image_size": 224}, "image 224 / patch 14"),
])
def test_image_configs_the_plan_does_not_build_are_refused(block, key, value, message):
    from phi3_export.arch.phi3v import Phi3V
    from phi3_export.errors import Phi3ExportError
    from phi3_export.fixtures.phi3v import phi3v_config
    from phi3_export.fixtures.tiny import fixture_shape
    from phi3_export.recipes import load_recipe

    recipe = load_recipe("phi-3-vision-128k")
    config = phi3v_config(recipe, fixture_shape(recipe), 1024, eos=2, bos=1)
    Phi3V.plan(config)  # as written: accepted
    if key == "clip":
        value = {**config[block]["clip"], **value}
    config[block] = {**config[block], key: value}
    with pytest.raises(Phi3ExportError, match=re.escape(message)):
        Phi3V.plan(config)
