"""Phi-3-vision / Phi-3.5-vision through the measuring and bundling commands: `chat --image`,
`validate` (image features, token counts, crop count, image-prompt logits, image speed),
`report`, `package` + `verify` with an image prompt, and the bad inputs the issue names."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime_genai as og
import pytest
from PIL import Image

from phi3_export.validate.images import ImagePrompts, load_image, sample_image

VISION, VISION35, TEXT = "phi-3-vision-128k", "phi-3.5-vision", "phi-3-mini-4k"


def _cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "phi3_export", *map(str, args)], capture_output=True, text=True, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("chat: using")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def checkpoint(fixture_dir):
    """The vision fixture: the published key layout (rope_scaling {"type": "su"})."""
    return fixture_dir


@pytest.fixture(scope="session")
def out(shared_cache, checkpoint):
    """``out(recipe, bits, target)`` -> a quantize OUT folder of the vision fixture."""
    from phi3_export.api import quantize

    def build(recipe: str, bits: int = 4, target: str = "cpu"):
        folder = shared_cache(json.dumps(["phi3v-cli-out-published", recipe, bits, target]),
                              lambda o: quantize(checkpoint(recipe), o / "out", bits=bits, targets=(target,)))
        return folder / "out"

    return build


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "photo.png"
    sample_image(640, 480, 3).save(path)
    return path


# ---- chat --image -----------------------------------------------------------------------------------------------------
def test_chat_with_an_image_answers_through_genai(out, png, tmp_path):
    artifact = out(VISION)
    result = _cli("chat", artifact, "--image", png, "--prompt", "What is in the picture?", "--max-new-tokens", "6")
    assert "user: What is in the picture?" in result.stdout and "assistant:" in result.stdout
    # Two images, the tags in the prompt; and the runtime's own processor.
    second = tmp_path / "second.jpg"
    sample_image(300, 900, 4).save(second)
    result = _cli("chat", artifact / "onnx-cpu", "--image", png, "--image", second, "--prompt",
                  "<|image_1|>\n<|image_2|>\nCompare them.", "--max-new-tokens", "4")
    assert "assistant:" in result.stdout
    result = _cli("chat", artifact, "--image", png, "--prompt", "Describe it.", "--max-new-tokens", "4", "--runtime-processor")
    assert "assistant:" in result.stdout


@pytest.mark.parametrize("recipe, crops", [(VISION, 16), (VISION35, 4)])
def test_own_inputs_carry_the_model_crop_count_and_decode_steps_work(out, recipe, crops):
    artifact = out(recipe) / "onnx-cpu"
    model = og.Model(str(artifact))
    tokenizer = og.Tokenizer(model)
    prompts = ImagePrompts(og, model, artifact)
    assert prompts.facts.num_crops == crops
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "<|image_1|>\nWhat is it?"}]),
                                           add_generation_prompt=True)
    images = [sample_image(700, 500, 1)]
    own = prompts.own(prompt, images)
    assert own.crops == crops + 1
    h, w = own.image_sizes[0]
    assert (own.ids == -1).sum() == own.image_tokens[0] == prompts.facts.image_tokens(h, w)
    # At 16 crops our ids and pixel_values are the runtime processor's (the text chunks are its own tokenisation).
    runtime = prompts.runtime(prompt, images)
    own16 = prompts.own(prompt, images, num_crops=16)
    assert np.array_equal(own16.ids, runtime.ids)
    assert np.abs(own16.pixel_values - runtime.pixel_values).max() < 0.02
    # Decode steps after the image prompt (the embedding model gets [0, H] image features then).
    for inputs in (own, runtime):
        length = inputs.ids.shape[1] + 5
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.set_inputs(inputs.tensors)
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        assert steps == 5 and len(generator.get_sequence(0)) == length


# ---- bad input --------------------------------------------------------------------------------------------------------
def test_bad_images_are_one_line_before_the_runtime(out, png, tmp_path):
    artifact = out(VISION) / "onnx-cpu"
    data = png.read_bytes()
    cases = {
        "truncated.png": data[: len(data) // 2],
        "text.png": b"not an image at all\n",  # the runtime's decoder would exit(1) on this (libjpeg)
        "garbage.png": data[:40] + b"\x00garbage" * 64,
        "fake.gif": b"GIF89a" + b"\x00" * 20,
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        _one_line_error(_cli("chat", artifact, "--image", path, "--prompt", "x", check=False), name)
    _one_line_error(_cli("chat", artifact, "--image", tmp_path / "absent.png", "--prompt", "x", check=False), "absent.png")
    _one_line_error(_cli("chat", artifact, "--image", png, "--prompt", "<|image_2|> x", check=False), "<|image_2|>")


def test_image_prompt_to_text_only_artifact_and_missing_processor_config(out, exported, png, tmp_path):
    text = exported(TEXT, targets=("cpu",)) / "onnx-cpu"
    _one_line_error(_cli("chat", text, "--image", png, "--prompt", "x", check=False), "text-only", "--image")
    broken = tmp_path / "no-processor"
    shutil.copytree(out(VISION) / "onnx-cpu", broken)
    (broken / "processor_config.json").unlink()
    _one_line_error(_cli("chat", broken, "--image", png, "--prompt", "x", check=False), "processor_config.json")
    # Without an image the artifact still chats: text-only prompts need no processor.
    assert "assistant:" in _cli("chat", broken, "--prompt", "Hello", "--max-new-tokens", "2").stdout
    _one_line_error(_cli("chat", broken, "--prompt", "Hello", "--runtime-processor", check=False), "--image")


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (30, 20), 128).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)


# ---- validate, report -------------------------------------------------------------------------------------------------
def _validate(out_folder, checkpoint_folder, tmp_path, *extra, check=True):
    json_path = tmp_path / "result.json"
    proc = _cli("validate", out_folder, "--reference", checkpoint_folder, "--window", "256", "--cache-dir", tmp_path / "cache",
                "--json", json_path, "--quiet", *extra, check=check)
    return proc, json.loads(json_path.read_text())


def test_validate_vision_artifact_phi3_vision(out, checkpoint, tmp_path):
    _, result = _validate(out(VISION, bits=32), checkpoint(VISION), tmp_path, "--runs", "1", "--prompt-lengths", "32",
                          "--new-tokens", "4")
    record = result["records"][0]
    checks = {c["name"]: c for c in record["checks"]}
    for name in ("tokenizer_parity", "image_feature_parity", "image_token_count", "crop_count", "hd_transform_parity",
                 "image_prompt_logits"):
        assert checks[name]["passed"] is True, checks[name]
    vision = record["vision"]
    assert vision["num_crops"] == 16 and vision["runtime_crops"] == 16 and vision["vision_precision"] == "fp32"
    for image in vision["images"]:
        assert image["runtime_image_tokens"] == image["formula_tokens"] == image["onnx_feature_rows"]
        assert image["feature_max_rel_diff"] <= 1e-4
    assert {(i["width"], i["height"]) for i in vision["images"]} >= {(500, 500), (1200, 300), (300, 1200), (20, 20), (2000, 1500)}
    assert vision["image_prompt"]["max_rel_diff"] <= 1e-4 and vision["image_prompt"]["first_divergence"] is None
    # Text-only accuracy through embedding.onnx + model.onnx: an fp32 artifact equals the reference.
    assert record["accuracy"]["kld_mean"] < 1e-9 and record["accuracy"]["top1_agreement"] == 1.0
    speed = vision["speed"]
    assert speed["image"] == "1344x1008" and speed["image_tokens"] == 1921
    assert speed["image_encode_s"]["median"] > 0 and speed["time_to_first_token_s"]["median"] > 0
    assert speed["decode_tokens_per_s"]["median"] > 0
    # report renders vision records (the checks table included).
    _cli("report", tmp_path / "result.json", "--out", tmp_path / "report")
    assert "image_feature_parity" in (tmp_path / "report" / "report.md").read_text() or \
        "image_feature_parity" in (tmp_path / "report" / "report.html").read_text()


def test_validate_phi35_vision_fails_the_crop_count_with_the_reason(out, checkpoint, tmp_path):
    proc, result = _validate(out(VISION35, bits=32), checkpoint(VISION35), tmp_path, "--no-speed", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    checks = {c["name"]: c for c in result["records"][0]["checks"]}
    crop = checks["crop_count"]
    assert crop["passed"] is False
    assert "hard-codes 16" in crop["detail"] and "num_crops 4" in crop["detail"] and "own HD transform" in crop["detail"]
    for name in ("image_feature_parity", "image_token_count", "hd_transform_parity", "image_prompt_logits"):
        assert checks[name]["passed"] is True, checks[name]
    assert result["records"][0]["vision"]["image_prompt"]["crop_slots"] == 5  # the logits ran on the model's 4 crops
    failed = [line for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert len(failed) == 1 and "crop_count" in failed[0]


def test_validate_int4_reports_image_prompt_logits(out, checkpoint, tmp_path):
    _, result = _validate(out(VISION), checkpoint(VISION), tmp_path, "--no-speed")
    checks = {c["name"]: c for c in result["records"][0]["checks"]}
    assert checks["image_prompt_logits"]["passed"] is None and "4-bit decoder" in checks["image_prompt_logits"]["detail"]
    assert checks["image_feature_parity"]["passed"] is True


# ---- package, verify --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["android", "ios"])
def test_package_and_verify_run_an_image_prompt(out, target, tmp_path):
    source = out(VISION, target="mobile")
    bundle = tmp_path / "bundle"
    name = json.loads((source / "manifest.json").read_text())["artifacts"][0]["name"]
    median = {"median": 0.5, "min": 0.5, "max": 0.5, "runs": 1}
    record = {"artifact": name, "status": "ok", "provider": "cpu", "speed": {}, "vision": {"speed": {
        "image": "1344x1008", "image_tokens": 1921, "image_encode_s": median, "time_to_first_token_s": median,
        "decode_tokens_per_s": median}}}
    (tmp_path / "v.json").write_text(json.dumps({"records": [record]}))
    _cli("package", source, "--target", target, "--with-onnx", "--out", bundle, "--validate", tmp_path / "v.json")
    files = {p.name for p in (bundle / "onnx").iterdir()}
    assert {"vision.onnx", "vision.onnx.data", "embedding.onnx", "embedding.onnx.data", "model.onnx",
            "processor_config.json", "genai_config.json"} <= files
    manifest = json.loads((bundle / "manifest.json").read_text())
    image = manifest["models"][0]["image_input"]
    assert image["models"] == {"vision": "vision.onnx", "embedding": "embedding.onnx", "decoder": "model.onnx"}
    assert image["num_crops"] == 16
    assert manifest["validation"][0]["image"]["time_to_first_token_s"] == 0.5
    result = _cli("verify", bundle)
    assert "an image prompt (64x48 PNG" in result.stdout and "verified" in result.stdout
    # The processor config is part of the bundle: without it verify names the file.
    (bundle / "onnx" / "processor_config.json").unlink()
    result = _cli("verify", bundle, check=False)
    assert result.returncode == 1 and "processor_config.json" in result.stderr


def test_ios_bundle_of_a_vision_model_needs_with_onnx_and_coreml_is_refused(out, checkpoint, tmp_path):
    source = out(VISION, target="mobile")
    _one_line_error(_cli("package", source, "--target", "ios", "--out", tmp_path / "b", check=False), "--with-onnx")
    _one_line_error(_cli("quantize", "--checkpoint", checkpoint(VISION), "--format", "coreml", "--out", tmp_path / "c",
                         "--quiet", check=False), "coreml", "image encoder")


def test_checkpoint_crop_count_must_match_the_recipe(checkpoint, tmp_path):
    import shutil

    folder = shutil.copytree(checkpoint(VISION), tmp_path / "ckpt")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["num_crops"] == 16
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "num_crops": 4}))
    proc = _cli("quantize", "--checkpoint", folder, "--out", tmp_path / "out", "--quiet", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "preprocessor_config.json: num_crops 4, but recipe phi-3-vision-128k says export.vision.num_crops 16" in lines[0]
    assert not (tmp_path / "out").exists()


def test_max_length_must_hold_one_image_prompt(checkpoint, tmp_path):
    from phi3_export.arch.phi3v import Phi3V

    plan = Phi3V.plan(json.loads((checkpoint(VISION) / "config.json").read_text()))
    assert plan.image.most_image_tokens(16) == 2653 and plan.image.most_image_tokens(4) == 781  # 10x4000 / tall images
    proc = _cli("quantize", "--checkpoint", checkpoint(VISION), "--out", tmp_path / "out", "--max-length", "2048", "--quiet",
                check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--max-length: 2048 tokens cannot hold an image prompt: one image takes up to 2653 tokens at num_crops 16" in lines[0]
    assert not (tmp_path / "out").exists()


def test_awq_on_the_text_decoder_of_a_vision_model(checkpoint, tmp_path):
    # AWQ calibrates the Phi-3 decoder (the published rope_scaling block read by its torch layers); the
    # image models are exported beside it and validate's image and text checks pass.
    out = tmp_path / "awq"
    _cli("quantize", "--checkpoint", checkpoint(VISION), "--out", out, "--method", "awq", "--calib-samples", "4", "--quiet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["method"] == "awq"
    assert {"vision.onnx", "embedding.onnx", "model.onnx"} <= {p.name for p in (out / "onnx-cpu").iterdir()}
    proc = _cli("validate", out, "--reference", checkpoint(VISION), "--no-speed", "--json", tmp_path / "v.json", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    record = json.loads((tmp_path / "v.json").read_text())["records"][0]
    assert record["settings"]["method"] == "awq" and {c["name"] for c in record["checks"]} >= {"image_feature_parity", "image_token_count"}
