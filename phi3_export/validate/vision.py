"""`validate` on an image + text artifact (Phi-3-vision): the image checks and image speed.

Beside the text-only checks (which run the decoder through embedding.onnx, ort_decoder.py):

- ``image_feature_parity``: vision.onnx vs the torch reference (arch/phi3v_image.py) on the
  runtime processor's own pixel_values for generated images of several aspect ratios; max
  |Δ| relative to the reference's largest feature, checked for fp32 (1e-4) and fp16 (1e-2)
  vision weights, reported for int8 / int4 ones.
- ``image_token_count``: the placeholder tokens the runtime inserts per image vs
  ``ImageEmbedding.image_tokens`` of the HD size its crop count gives, and the vision
  model's feature rows.
- ``crop_count``: the runtime processor's crop slots vs the model's ``num_crops + 1``.
  onnxruntime-genai 0.18 (onnxruntime-extensions' Phi3ImageTransform) hard-codes 16 crops:
  Phi-3.5-vision (4) fails this check, with the reason; our own `chat` does its own HD
  transform with the model's crop count.
- ``hd_transform_parity``: our HD transform (what `chat` feeds) vs the runtime's pixel_values
  at the runtime's crop count.
- ``image_prompt_logits``: first-step logits of an image prompt (our inputs, the model's crop
  count) through onnxruntime-genai vs the reference; checked for fp32 (1e-4 relative) and fp16
  decoders, reported (KLD, top-1) for quantized ones; greedy tokens after it are compared too.

Speed (``image_speed``, in the speed process): vision.onnx alone on a 1344 x 1008 image, time to
first token of a one-image prompt, decode tokens/s after it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from phi3_export.arch.hd_transform import hd_size, hd_transform
from phi3_export.errors import Phi3ExportError
from phi3_export.validate import accuracy
from phi3_export.validate.images import RUNTIME_CROPS, ImagePrompts, processor_facts, sample_image

# (name, width, height): square, wide, tall, tiny (upscaled), larger than 1344 px
TEST_IMAGES = (("square", 500, 500), ("wide", 1200, 300), ("tall", 300, 1200), ("tiny", 20, 20), ("large", 2000, 1500))
LOGIT_IMAGE = ("wide", 700, 500)
SPEED_IMAGE = (1344, 1008)
FEATURE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # relative max |Δ|; int8 / int4: reported
LOGIT_TOLERANCE = {32: 1e-4, 16: 1e-2}  # by decoder bits; 4 / 8: reported
PIXEL_TOLERANCE = 0.02  # normalised units: 1 LSB of 8-bit input is ~0.015
PROMPT = "Describe the image."
GENERATED = 8  # greedy tokens compared after the image prompt


def _check(name: str, passed: bool | None, detail: str, **extra) -> dict:
    return {"name": name, "passed": passed, "detail": detail, **extra}


def vision_precision(folder: Path, genai: dict) -> str:
    """fp32 / fp16 / int8 / int4, from vision.onnx's graph (MatMulNBits bits, pixel_values type)."""
    import onnx

    from phi3_export.paths import inside

    path = inside(Path(folder), genai["model"]["vision"]["filename"], "genai_config.json: model.vision.filename")
    model = onnx.load(str(path), load_external_data=False)
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    if bits:
        return f"int{min(bits)}"
    # fp16 weights are stored fp16 whatever the target computes in (the cpu graph casts them up).
    stored = {t.data_type for t in model.graph.initializer if t.dims and len(t.dims) >= 2}
    pixels = model.graph.input[0].type.tensor_type.elem_type
    return "fp16" if onnx.TensorProto.FLOAT16 in stored or pixels == onnx.TensorProto.FLOAT16 else "fp32"


def _worst(values):
    """max that a NaN cannot hide behind a finite value: a non-finite value is the worst."""
    return max(values, key=lambda v: (not math.isfinite(v), v if math.isfinite(v) else 0.0))


def _relative(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) if got.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return diff, diff / scale if scale else diff


class VisionCheck:
    """The image checks of one artifact against the reference (module docstring)."""

    def __init__(self, artifact, ref, threads: int = 0):
        import onnxruntime as ort
        import onnxruntime_genai as og

        from phi3_export.arch.phi3v_image import ImageEmbeddingReference

        self.artifact, self.ref, self.og = artifact, ref, og
        self.genai = artifact.genai_config
        self.plan_image = ref.model.plan.image
        from phi3_export.validate.speed import load_model

        self.model = load_model(artifact.folder, "cpu", threads)  # the checks run on the CPU, whatever the target
        self.tokenizer = og.Tokenizer(self.model)
        self.prompts = ImagePrompts(og, self.model, artifact.folder)
        self.reference = ImageEmbeddingReference.from_checkpoint(self.plan_image, ref.ckpt)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        vision = self.genai["model"]["vision"]
        from phi3_export.paths import inside

        path = inside(artifact.folder, vision["filename"], "genai_config.json: model.vision.filename")
        self.vision = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.vision_io = vision
        # The manifest says what the recipe asked for; the graph where an older manifest does not.
        self.precision = (artifact.entry.get("vision") or {}).get("precision") or vision_precision(artifact.folder, self.genai)

    def prompt(self, text: str = PROMPT) -> str:
        messages = [{"role": "user", "content": f"<|image_1|>\n{text}"}]
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def onnx_features(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
        io = self.vision_io
        kind = next(i.type for i in self.vision.get_inputs() if i.name == io["inputs"]["pixel_values"])
        feeds = {io["inputs"]["pixel_values"]: pixel_values.astype(np.float16 if kind == "tensor(float16)" else np.float32),
                 io["inputs"]["image_sizes"]: image_sizes.astype(np.int64)}
        return self.vision.run([io["outputs"]["image_features"]], feeds)[0].astype(np.float32)

    def per_image(self) -> list[dict]:
        """Runtime-processor inputs of each test image, with ONNX and reference features."""
        out = []
        for seed, (name, width, height) in enumerate(TEST_IMAGES):
            image = sample_image(width, height, seed)
            inputs = self.prompts.runtime(self.prompt(), [image])
            got = self.onnx_features(inputs.pixel_values, inputs.image_sizes)
            expected = self.reference(inputs.pixel_values.astype(np.float32), inputs.image_sizes).numpy()
            crops = inputs.crops - 1
            _, _, hd_w, hd_h = hd_size(width, height, crops)
            own, own_sizes = hd_transform([image], crops)
            diff, rel = _relative(got, expected) if got.shape == expected.shape else (float("inf"), float("inf"))
            out.append({
                "image": name, "width": width, "height": height, "image_sizes": [int(v) for v in inputs.image_sizes[0]],
                "runtime_crop_slots": inputs.crops, "runtime_image_tokens": inputs.image_tokens[0],
                "placeholder_ids": int((inputs.ids == -1).sum()), "formula_tokens": self.plan_image.image_tokens(hd_h, hd_w),
                "onnx_feature_rows": int(got.shape[0]), "reference_feature_rows": int(expected.shape[0]),
                "feature_max_abs_diff": diff, "feature_max_rel_diff": rel,
                "hd_transform_max_abs_diff": float(np.abs(own - inputs.pixel_values.astype(np.float32)).max())
                if own.shape == inputs.pixel_values.shape and np.array_equal(own_sizes, inputs.image_sizes) else float("inf"),
            })
        return out

    def logits(self, decoder_bits: int | None) -> dict:
        """First-step logits of an image prompt (our inputs, the model's crops), then greedy tokens."""
        og, ckpt, decoder = self.og, self.ref.ckpt, self.ref.model.plan.decoder
        from phi3_export.checkpoint.stream import embedded

        name, width, height = LOGIT_IMAGE
        inputs = self.prompts.own(self.prompt(), [sample_image(width, height, 7)])
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=inputs.ids.shape[1] + GENERATED)
        generator = og.Generator(self.model, params)
        generator.set_inputs(inputs.tensors)
        first = np.asarray(generator.get_logits(), np.float32).reshape(-1)
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        del generator
        ids = torch.from_numpy(inputs.ids)
        features = self.reference(inputs.pixel_values, inputs.image_sizes)
        full = torch.cat([ids, torch.tensor([new[:-1]], dtype=torch.int64)], dim=1)
        x = embedded(ckpt, decoder, full.clamp(min=0))
        x[full < 0] = features.to(x.dtype)
        hidden = self.ref.model.hidden_states_of(x)[:, inputs.ids.shape[1] - 1 :]
        expected = next(iter(self.ref.model.logits(hidden)))
        diff, rel = _relative(first, expected[0])
        cmp = accuracy.Comparison()
        cmp.add(expected[:1], first[None], np.asarray([new[0]]))
        summary = cmp.summary()
        return {"image": name, "width": width, "height": height, "crop_slots": inputs.crops, "prompt_tokens": int(ids.shape[1]),
                "image_tokens": inputs.image_tokens[0], "max_abs_diff": diff, "max_rel_diff": rel,
                "kld": summary["kld_mean"], "top1_same": bool(int(first.argmax()) == int(expected[0].argmax())),
                "decoder_bits": decoder_bits, "generated_tokens": len(new),
                "first_divergence": accuracy.first_divergence(new, expected.argmax(-1))}

    def run(self, decoder_bits: int | None) -> tuple[list[dict], dict]:
        images = self.per_image()
        logits = self.logits(decoder_bits)
        return checks(images, logits, self.precision, self.prompts.facts.num_crops, self._checkpoint_crops()), {
            "vision_precision": self.precision, "num_crops": self.prompts.facts.num_crops, "images": images,
            "image_prompt": logits, "runtime_crops": images[0]["runtime_crop_slots"] - 1}

    def _checkpoint_crops(self) -> int | None:
        path = Path(self.ref.folder) / "preprocessor_config.json"
        try:
            value = json.loads(path.read_text()).get("num_crops") if path.is_file() else None
        except (OSError, ValueError):
            return None
        return value if isinstance(value, int) else None


def checks(images: list[dict], logits: dict, precision: str, num_crops: int, checkpoint_crops: int | None) -> list[dict]:
    out = []
    worst = next(r for r in images if r["feature_max_rel_diff"] is _worst([i["feature_max_rel_diff"] for i in images]))
    tolerance = FEATURE_TOLERANCE.get(precision)
    rows_ok = all(r["onnx_feature_rows"] == r["reference_feature_rows"] for r in images)
    detail = (f"{precision} vision model vs the torch reference on the runtime's pixel_values, {len(images)} images: "
              f"max |Δ| {worst['feature_max_abs_diff']:.2e} ({worst['feature_max_rel_diff']:.2e} relative, {worst['image']})")
    if tolerance is None:
        out.append(_check("image_feature_parity", None if rows_ok else False, f"reported: {detail}"))
    else:
        out.append(_check("image_feature_parity", rows_ok and worst["feature_max_rel_diff"] <= tolerance,
                          f"{detail}; tolerance {tolerance:g}"))
    bad = [r for r in images if len({r["runtime_image_tokens"], r["placeholder_ids"], r["formula_tokens"], r["onnx_feature_rows"]}) != 1]
    counts = ", ".join(f"{r['image']} {r['width']}x{r['height']}: {r['runtime_image_tokens']}" for r in images)
    out.append(_check("image_token_count", not bad,
                      f"runtime tokens = formula = vision rows for every image ({counts})" if not bad else
                      "; ".join(f"{r['image']}: runtime {r['runtime_image_tokens']} (ids {r['placeholder_ids']}), formula "
                                f"{r['formula_tokens']}, vision rows {r['onnx_feature_rows']}" for r in bad)))
    runtime = images[0]["runtime_crop_slots"] - 1
    if checkpoint_crops is not None and checkpoint_crops != num_crops:
        out.append(_check("crop_count", False, f"the artifact's processor_config.json says num_crops {num_crops}, "
                                               f"the checkpoint's preprocessor_config.json {checkpoint_crops}"))
    elif runtime == num_crops:
        out.append(_check("crop_count", True, f"the runtime's processor makes {runtime} crops + the global image per image, "
                                              f"the model's num_crops {num_crops}"))
    else:
        why = (" (onnxruntime-extensions' Phi3ImageTransform hard-codes 16 and ignores processor_config.json)"
               if runtime == RUNTIME_CROPS else "")
        out.append(_check("crop_count", False,
                          f"the runtime's processor makes {runtime} crops per image{why}, the model expects num_crops "
                          f"{num_crops}: apps calling create_multimodal_processor() feed it {runtime}-crop images; "
                          f"phi3-export chat and verify use their own HD transform with {num_crops} crops"))
    hd = _worst([r["hd_transform_max_abs_diff"] for r in images])
    out.append(_check("hd_transform_parity", hd <= PIXEL_TOLERANCE,
                      f"our HD transform vs the runtime's pixel_values at {runtime} crops: max |Δ| {hd:.2e} "
                      f"(tolerance {PIXEL_TOLERANCE})"))
    bits = logits["decoder_bits"]
    # Checked only when both ends are float32 (a quantized vision model moves the logits as much as a decoder would).
    tolerance = LOGIT_TOLERANCE.get(bits) if precision == "fp32" else None
    detail = (f"{logits['width']}x{logits['height']} image, num_crops {logits['crop_slots'] - 1}, {logits['prompt_tokens']} "
              f"tokens through onnxruntime-genai: max |Δ| {logits['max_abs_diff']:.2e} ({logits['max_rel_diff']:.2e} "
              f"relative), KLD {logits['kld']:.2e}, top-1 {'same' if logits['top1_same'] else 'differs'}; greedy "
              f"tokens after it: {'all ' + str(logits['generated_tokens']) + ' match' if logits['first_divergence'] is None else 'part at ' + str(logits['first_divergence'])}")
    if tolerance is None:
        out.append(_check("image_prompt_logits", None, f"reported ({bits}-bit decoder, {precision} vision model): {detail}"))
    else:
        out.append(_check("image_prompt_logits", logits["max_rel_diff"] <= tolerance, f"{detail}; tolerance {tolerance:g}"))
    return out


def validate_vision(artifact, ref, threads: int = 0) -> tuple[list[dict], dict]:
    """(checks, the record's ``vision`` block); a missing processor config or reference image
    embedding is a failed check, not an abort: the text checks still run."""
    if ref.model.plan.image is None:
        return [_check("image_prompts", False, f"{ref.folder}: the reference has no image embedding (not a Phi-3-vision "
                                               "checkpoint) but the artifact has a vision model")], {}
    try:
        processor_facts(artifact.folder)
    except Phi3ExportError as exc:
        return [_check("image_prompts", False, f"not run: {exc}")], {}
    bits = (artifact.manifest.get("settings") or {}).get("bits")
    return VisionCheck(artifact, ref, threads).run(bits)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def image_speed(folder: Path, model, threads: int, new_tokens: int, runs: int, size: tuple[int, int] = SPEED_IMAGE) -> dict:
    """Image encode time (vision.onnx alone), TTFT of a one-image prompt, decode tok/s after it
    (our inputs at the artifact's crop count); one warm-up run, then ``runs``."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    genai = json.loads((Path(folder) / "genai_config.json").read_text())
    tokenizer = og.Tokenizer(model)
    prompts = ImagePrompts(og, model, folder)
    text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": f"<|image_1|>\n{PROMPT}"}]),
                                         add_generation_prompt=True)
    inputs = prompts.own(text, [sample_image(*size)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    io = genai["model"]["vision"]
    session = ort.InferenceSession(str(Path(folder) / io["filename"]), opts, providers=["CPUExecutionProvider"])
    kind = next(i.type for i in session.get_inputs() if i.name == io["inputs"]["pixel_values"])
    feeds = {io["inputs"]["pixel_values"]: inputs.pixel_values.astype(np.float16 if kind == "tensor(float16)" else np.float32),
             io["inputs"]["image_sizes"]: inputs.image_sizes}
    encode, ttft, decode = [], [], []
    length = inputs.ids.shape[1] + new_tokens
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        session.run(None, feeds)
        encode.append(time.perf_counter() - t0)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.set_inputs(inputs.tensors)
        generator.generate_next_token()
        t1 = time.perf_counter()
        steps = 0
        while not generator.is_done() and steps < new_tokens - 1:
            generator.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        if steps:
            decode.append(steps / (t2 - t1))
        del generator
    return {"image": f"{size[0]}x{size[1]}", "crop_slots": inputs.crops, "image_tokens": inputs.image_tokens[0],
            "prompt_tokens": int(inputs.ids.shape[1]), "decode_tokens": new_tokens,
            "image_encode_s": _stats(encode[1:]), "time_to_first_token_s": _stats(ttft[1:]),
            "decode_tokens_per_s": _stats(decode[1:]) if len(decode) > 1 else None}


def speed_lines(records: list[dict]) -> list[str]:
    """One line per record with image speed figures (validate's table, after the text table)."""
    lines = []
    for r in records:
        speed = (r.get("vision") or {}).get("speed") or {}
        if "image_encode_s" not in speed:
            continue
        decode = (speed.get("decode_tokens_per_s") or {}).get("median")
        lines.append(f"{r['artifact']} [{r.get('provider')}]: {speed['image']} image, num_crops {speed['crop_slots'] - 1}, "
                     f"{speed['image_tokens']} image tokens: encode {speed['image_encode_s']['median']:.3f} s, "
                     f"TTFT {speed['time_to_first_token_s']['median']:.3f} s, decode "
                     f"{'-' if decode is None else f'{decode:.1f}'} tok/s")
    return lines
