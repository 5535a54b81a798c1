"""Phi-3-vision through the plan to ONNX: vision.onnx's image features vs the torch reference on the runtime
processor's own pixel_values (several aspect ratios, two images at once), the runtime's image-token counts,
first-step logits of an image prompt vs the streamed reference, text-only prompts as the Phi-3 path, int4
decoder codes, generation with an image through onnxruntime-genai (decode steps get [0, H] image features),
int8 / int4 / fp16 vision weights, byte-identical exports, export memory flat in decoder layers."""

import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from phi3_export.arch import architecture
from phi3_export.arch.phi3v_image import ImageEmbeddingReference
from phi3_export.checkpoint import Checkpoint
from phi3_export.memory import run_measured
from phi3_export.quant.qcheckpoint import pack_codes
from phi3_export.quant.rtn import quantize_rtn
from phi3_export.validate.reference import StreamedReference

RECIPE = "phi-3-vision-128k"
TOL = 1e-4
# (width, height) of the generated test images: square, wide, tall, tiny (upscaled to 16 crops), larger than 1344 px.
SIZES = {"square": (500, 500), "wide": (1200, 300), "tall": (300, 1200), "tiny": (20, 20), "large": (2000, 1500)}
PROMPT = "<|user|>\n{tags}What is in the picture?<|end|>\n<|assistant|>\n"


def _prompt(n_images: int) -> str:
    return PROMPT.format(tags="".join(f"<|image_{k + 1}|>\n" for k in range(n_images)))


def _plan(folder):
    config = json.loads((folder / "config.json").read_text())
    return architecture(config["architectures"][0]).plan(config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG files of random pixels at each size (random content exercises every crop)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    paths = {}
    for name, (w, h) in SIZES.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def fp32(fixture_dir, exported):
    return fixture_dir(RECIPE), exported(RECIPE, bits=32, targets=("cpu",)) / "onnx-cpu"


@pytest.fixture(scope="module")
def reference(fp32):
    folder, _ = fp32
    ckpt = Checkpoint(folder)
    return ImageEmbeddingReference.from_checkpoint(_plan(folder).image, ckpt)


def _processed(artifact, paths, processor=None) -> dict[str, np.ndarray]:
    """The runtime processor's input_ids, pixel_values, image_sizes and num_image_tokens."""
    processor = processor or og.Model(str(artifact)).create_multimodal_processor()
    inputs = processor(_prompt(len(paths)), images=og.Images.open(*map(str, paths)))
    return {name: inputs[name].as_numpy() for name in ("input_ids", "pixel_values", "image_sizes", "num_image_tokens")}


def _vision(artifact, inputs) -> np.ndarray:
    session = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]})[0]


class Sessions:
    """embedding.onnx + model.onnx with plain ONNX Runtime: a prompt step, then cached decode steps."""

    def __init__(self, artifact):
        genai = json.loads((artifact / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv, self.head = genai["num_hidden_layers"], genai["num_key_value_heads"], genai["head_size"]
        self.hidden = genai["hidden_size"]
        self.embedding = ort.InferenceSession(str(artifact / "embedding.onnx"), providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])

    def step(self, ids: np.ndarray, features: np.ndarray | None, cache: dict | None):
        features = np.zeros((0, self.hidden), np.float32) if features is None else features
        embeds = self.embedding.run(None, {"input_ids": ids.astype(np.int64), "image_features": features})[0]
        if cache is None:
            cache = {f"past_key_values.{i}.{k}": np.zeros((1, self.kv, 0, self.head), np.float32)
                     for i in range(self.layers) for k in ("key", "value")}
        past = next(iter(cache.values())).shape[2]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, past + ids.shape[1]), np.int64), **cache}
        names = [o.name for o in self.decoder.get_outputs()]
        outs = dict(zip(names, self.decoder.run(None, feeds)))
        cache = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(self.layers) for k in ("key", "value")}
        return outs["logits"], cache


def _reference_logits(folder, ids: np.ndarray, features: torch.Tensor) -> np.ndarray:
    """Streamed torch reference from inputs_embeds: the checkpoint's table rows, image rows from ``features``."""
    ref = StreamedReference(Checkpoint(folder))
    table = ref.ckpt.tensor(ref.plan.decoder.embedding)
    x = ImageEmbeddingReference.embed(torch.from_numpy(ids), features, table)
    return next(ref.logits(ref.hidden_states_of(x)))


def _recipe_file(tmp_path, precision: str):
    """The shipped recipe (same name: the fixture scales it down) with another vision precision."""
    from phi3_export.recipes.loader import recipes_dir

    text = (recipes_dir() / f"{RECIPE}.yaml").read_text()
    path = tmp_path / f"{RECIPE}-{precision}.yaml"
    path.write_text(text.replace("precision: fp32", f"precision: {precision}"))
    return path


# ---- image features ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [*SIZES, "two images"])
def test_fp32_image_features_match_reference_on_runtime_pixel_values(case, fp32, reference, images):
    folder, artifact = fp32
    paths = [images["wide"], images["tall"]] if case == "two images" else [images[case]]
    inputs = _processed(artifact, paths)
    assert inputs["pixel_values"].shape[1] == 17  # onnxruntime-genai 0.18 makes 16 crops whatever the config says
    got = _vision(artifact, inputs)
    want = reference(inputs["pixel_values"], inputs["image_sizes"]).numpy()
    assert got.shape == want.shape
    delta = float(np.abs(got - want).max())
    print(f"{case}: image_sizes {inputs['image_sizes'].tolist()} tokens {got.shape[0]} max |Δ| {delta:.2e}")
    assert delta <= TOL
    # The runtime's placeholders: image k's count of -k ids, as the plan's formula gives for its HD size.
    image = _plan(folder).image
    ids = inputs["input_ids"][0]
    for k, (h, w) in enumerate(inputs["image_sizes"].tolist()):
        assert int((ids == -(k + 1)).sum()) == image.image_tokens(h, w) == int(inputs["num_image_tokens"][k, 0])
    assert got.shape[0] == int((ids < 0).sum())


def test_vision_takes_our_own_crop_count(fp32, reference, images):
    """Our own HD transform's layout (num_crops + 1 slots, e.g. Phi-3.5-vision's 4 crops): the crop dimension is dynamic."""
    _, artifact = fp32
    inputs = _processed(artifact, [images["large"]])
    pixel_values = inputs["pixel_values"][:, :5]  # global + 4 sub-crops of a 672 x 672 HD image
    sizes = np.array([[672, 672]], np.int64)
    got = _vision(artifact, {"pixel_values": pixel_values, "image_sizes": sizes})
    want = reference(pixel_values, sizes).numpy()
    assert got.shape == (757, want.shape[1]) and float(np.abs(got - want).max()) <= TOL
    # onnxruntime-genai runs the artifact on such inputs too (our own tensors instead of its processor's).
    model = og.Model(str(artifact))
    ids = inputs["input_ids"][0]
    first = int(np.argmax(ids < 0))
    ids = np.concatenate([ids[:first], np.full(757, -1, ids.dtype), ids[first + int((ids < 0).sum()):]])[None]
    named = og.NamedTensors()
    named["input_ids"], named["pixel_values"], named["image_sizes"] = ids.astype(np.int32), pixel_values, sizes
    named["num_image_tokens"] = np.array([[757]], np.int64)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 3, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(named)
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == ids.shape[1] + 3


# ---- logits -----------------------------------------------------------------------------------------------------------
def test_image_prompt_first_step_logits_match_reference(fp32, reference, images):
    folder, artifact = fp32
    inputs = _processed(artifact, [images["wide"]])
    ids = inputs["input_ids"].astype(np.int64)
    features = reference(inputs["pixel_values"], inputs["image_sizes"])
    want = _reference_logits(folder, ids, features)
    got, _ = Sessions(artifact).step(ids, _vision(artifact, inputs), None)
    delta = float(np.abs(got[0] - want).max())
    print(f"image prompt of {ids.shape[1]} tokens: max |Δlogit| {delta:.2e}")
    assert delta <= TOL


def test_text_only_logits_equal_the_phi3_path(fp32, tmp_path):
    """The same checkpoint exported as a text-only Phi-3 (vision tensors dropped): same logits for a text prompt."""
    from safetensors.torch import load_file, save_file

    from phi3_export.api import quantize
    from phi3_export.validate.ort_decoder import OrtDecoder

    folder, artifact = fp32
    text = tmp_path / "text-only"
    text.mkdir()
    from phi3_export.fixtures.phi3v import _decoder_config

    # The decoder's Phi3Config keys, no fixture mark: the generic Phi-3 recipe (same precision: --bits 32).
    config = _decoder_config(json.loads((folder / "config.json").read_text()))
    config.pop("phi3_export_fixture")
    config.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
    (text / "config.json").write_text(json.dumps(config))
    plan = _plan(folder)
    drop = set(plan.image.tensors()) | set(plan.ignorable)
    for shard in folder.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(shard).items() if k not in drop}, str(text / shard.name))
    for f in folder.iterdir():
        if f.is_file() and f.suffix not in (".safetensors",) and f.name != "config.json":
            shutil.copy(f, text / f.name)
    phi3 = quantize(text, tmp_path / "out", bits=32, targets=("cpu",))
    assert phi3["model"]["architecture"] == "Phi3ForCausalLM"
    model = og.Model(str(artifact))
    processor = model.create_multimodal_processor()
    ids = processor(_prompt(0))["input_ids"].as_numpy().astype(np.int64)
    assert (ids >= 0).all()
    decoder = OrtDecoder(tmp_path / "out" / "onnx-cpu")
    want, _ = decoder.step(ids, decoder.empty_cache())
    got, _ = Sessions(artifact).step(ids, None, None)
    delta = float(np.abs(got - want).max())
    print(f"text-only prompt: max |Δlogit| vs the Phi-3 artifact {delta:.2e}")
    assert delta <= 1e-6


# ---- int4 decoder, generation, determinism ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4(fixture_dir, exported):
    return fixture_dir(RECIPE), exported(RECIPE, bits=4, targets=("cpu",))


def test_int4_decoder_codes_are_our_quantizers(int4):
    folder, out = int4
    model = onnx.load(str(out / "onnx-cpu" / "model.onnx"))
    init = {t.name: numpy_helper.to_array(t, base_dir=str(out / "onnx-cpu")) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    assert "input_ids" not in [i.name for i in model.graph.input] and "inputs_embeds" in [i.name for i in model.graph.input]
    assert not [n for n in model.graph.node if n.name.startswith("/model/embed_tokens/")]  # the lookup is in embedding.onnx
    assert _plan(folder).decoder.embedding not in init
    ckpt = Checkpoint(folder)
    checked = 0
    for layer in _plan(folder).decoder.layers:
        p = f"/model/layers.{layer.index}"
        for lin, path in ((layer.attention.qkv, f"{p}/attn/qkv_proj"), (layer.attention.o, f"{p}/attn/o_proj"),
                          (layer.mlp.gate_up, f"{p}/mlp/gate_up_proj"), (layer.mlp.down, f"{p}/mlp/down_proj")):
            node = nodes[f"{path}/MatMulNBits"]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            q = quantize_rtn(ckpt.tensor(lin.weight), attrs["bits"], attrs["block_size"], symmetric=True)
            assert np.array_equal(init[node.input[1]].reshape(q.codes.shape[0], -1), pack_codes(q.codes, 4).numpy()), lin.weight
            assert np.array_equal(init[node.input[2]], q.scales.numpy()), lin.weight
            checked += 1
    assert checked == 4 * len(_plan(folder).decoder.layers)


def test_int4_generates_with_an_image_through_genai_like_our_decode_loop(int4, images):
    _, out = int4
    artifact = out / "onnx-cpu"
    model = og.Model(str(artifact))
    processor = model.create_multimodal_processor()
    inputs = processor(_prompt(2), images=og.Images.open(str(images["square"]), str(images["tall"])))
    prompt = inputs["input_ids"].as_numpy().astype(np.int64)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    generated = []
    while not generator.is_done():
        generator.generate_next_token()
        generated.append(int(generator.get_next_tokens()[0]))
    assert len(generated) >= 2  # decode steps ran: each got [0, H] image features
    # The same greedy tokens from our own loop: vision once, then embedding + decoder with a KV cache,
    # decode steps fed image_features of shape [0, H].
    sessions = Sessions(artifact)
    features = _vision(artifact, {"pixel_values": inputs["pixel_values"].as_numpy(), "image_sizes": inputs["image_sizes"].as_numpy()})
    logits, cache = sessions.step(prompt, features, None)
    ours = []
    while len(ours) < len(generated):
        ours.append(int(logits[0, -1].argmax()))
        logits, cache = sessions.step(np.array([[ours[-1]]]), None, cache)
    assert ours == generated


def test_artifact_layout_configs_and_manifest(int4):
    _, out = int4
    artifact = out / "onnx-cpu"
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = [a for a in manifest["artifacts"] if a["format"] == "onnx"]
    listed = {f["path"] for f in entry["files"]}
    on_disk = {f"onnx-cpu/{p.name}" for p in artifact.iterdir()}
    assert listed == on_disk
    assert {"model.onnx", "model.onnx.data", "embedding.onnx", "embedding.onnx.data", "vision.onnx", "vision.onnx.data",
            "processor_config.json", "genai_config.json", "tokenizer.json", "LICENSE"} <= {p.name for p in artifact.iterdir()}
    assert entry["vision"]["precision"] == "fp32" and entry["vision"]["num_crops"] == 16
    genai = json.loads((artifact / "genai_config.json").read_text())["model"]
    assert genai["type"] == "phi3v"
    assert "inputs_embeds" in genai["decoder"]["inputs"] and "input_ids" not in genai["decoder"]["inputs"]
    assert genai["embedding"]["filename"] == "embedding.onnx" and genai["vision"]["filename"] == "vision.onnx"
    assert genai["vision"]["config_filename"] == "processor_config.json"
    transforms = [t["operation"] for t in json.loads((artifact / "processor_config.json").read_text())["processor"]["transforms"]]
    assert [t["type"] for t in transforms] == ["DecodeImage", "ConvertRGB", "Phi3ImageTransform"]
    assert transforms[0]["attrs"] == {"color_space": "BGR"} and transforms[2]["attrs"]["num_crops"] == 16


def test_two_exports_byte_identical(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    folder = fixture_dir(RECIPE)
    recipe = _recipe_file(tmp_path, "int4")
    manifests = [quantize(folder, tmp_path / f"out{k}", bits=4, targets=("cpu",), recipe=str(recipe)) for k in (0, 1)]
    digests = [{f["path"]: f["sha256"] for a in m["artifacts"] for f in a["files"]} for m in manifests]
    assert digests[0] == digests[1] and "onnx-cpu/vision.onnx.data" in digests[0]


# ---- vision precision ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, bound", [("fp16", 0.01), ("int8", 0.1), ("int4", 0.5)])
def test_vision_precision_runs_and_its_error(precision, bound, fixture_dir, reference, images, tmp_path):
    from phi3_export.api import quantize

    folder = fixture_dir(RECIPE)
    manifest = quantize(folder, tmp_path / "out", bits=4, targets=("cpu",), recipe=str(_recipe_file(tmp_path, precision)))
    assert manifest["artifacts"][0]["vision"]["precision"] == precision
    artifact = tmp_path / "out" / "onnx-cpu"
    graph = onnx.load(str(artifact / "vision.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert ("MatMulNBits" in ops) == precision.startswith("int")
    inputs = _processed(artifact, [images["large"]])
    got = _vision(artifact, inputs)
    want = reference(inputs["pixel_values"], inputs["image_sizes"]).numpy()
    delta = float(np.abs(got - want).max())
    relative = float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))
    print(f"vision {precision}: max |Δ| {delta:.3e} (features up to {np.abs(want).max():.2f}), relative rms {relative:.2e}, "
          f"vision.onnx.data {(artifact / 'vision.onnx.data').stat().st_size} bytes")
    assert relative <= bound


def test_dml_vision_computes_in_fp16_close_to_reference(fp32, reference, images, tmp_path):
    from phi3_export.api import quantize

    folder, cpu_artifact = fp32
    quantize(folder, tmp_path / "out", bits=4, targets=("dml",))
    artifact = tmp_path / "out" / "onnx-dml"
    graph = onnx.load(str(artifact / "vision.onnx"), load_external_data=False).graph
    assert not {n.op_type for n in graph.node} & {"If", "Loop", "Scan"}  # DirectML graph capture runs no control flow
    inputs = _processed(cpu_artifact, [images["large"]])
    session = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": inputs["pixel_values"].astype(np.float16), "image_sizes": inputs["image_sizes"]}
    got = session.run(None, feeds)[0].astype(np.float32)
    want = reference(inputs["pixel_values"], inputs["image_sizes"]).numpy()
    relative = float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))
    print(f"vision dml (fp16 compute): max |Δ| {float(np.abs(got - want).max()):.3e}, relative rms {relative:.2e}")
    assert relative <= 0.01


# ---- memory ---------------------------------------------------------------------------------------------------------------
def test_export_memory_flat_in_decoder_layers(tmp_path):
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes import load_recipe

    # 2 vs 16 decoder layers at width 1024, the lowest peak of two runs each (tests/conftest.py WIDE says why).
    peaks = {}
    for layers in (2, 16):
        checkpoint = tmp_path / f"ckpt{layers}"
        make_fixture(load_recipe(RECIPE), checkpoint, layers=layers, hidden=1024, dtype=torch.bfloat16)
        for run in range(2):
            result = run_measured([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(checkpoint), "--out",
                                   str(tmp_path / f"out{layers}-{run}"), "--target", "cpu", "--quiet"], interval_s=0.005)
            assert result.returncode == 0, result.stderr
            peaks[layers] = min(peaks.get(layers, float("inf")), result.peak_rss_anon_mb)
    print(f"export peak RssAnon: {peaks}")
    assert peaks[16] <= 1.3 * peaks[2], peaks
