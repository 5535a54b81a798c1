"""Image prompts for an image + text artifact (genai_config ``"type": "phi3v"``, a ``vision`` section).

Every image is opened and decoded with PIL first, then handed to onnxruntime-genai as PNG
bytes: the runtime's own decoder sends anything that is not PNG to libjpeg, whose error
handler calls ``exit(1)`` (notes/phi3v-study.md, trap 5), so a text file named ``.png``
would end the process instead of raising.

Two ways to build the prompt's inputs:

- ``own`` (the default of `chat` and of validate's image-prompt checks): our HD transform
  (arch/hd_transform.py, the runtime's resampling) with the artifact's own crop count from
  processor_config.json, and hand-built ``og.NamedTensors`` (``input_ids`` with ``-k`` runs for
  image k, ``pixel_values [n, crops + 1, 3, 336, 336]``, ``image_sizes [n, 2]``,
  ``num_image_tokens [n, 1]``). onnxruntime-genai 0.18's Phi3ImageTransform hard-codes 16 crops
  whatever the config says, so this is how Phi-3.5-vision gets its 4.
- ``runtime``: ``model.create_multimodal_processor()``, what an app calling the runtime gets
  (`verify` runs this one, as the bundle's app would, and validate's feature checks feed its
  pixel_values to the reference).

The text between image tags is tokenised by the runtime's processor, chunk by chunk, as it does
itself (no BOS), so both ways give the same ids at 16 crops.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json

if TYPE_CHECKING:
    from PIL import Image

PROCESSOR_CONFIG = "processor_config.json"
TAG = re.compile(r"<\|image_(\d+)\|>")
TRANSFORM_OP = "Phi3ImageTransform"
RUNTIME_CROPS = 16  # onnxruntime-extensions' Phi3ImageTransform: `constexpr int max_crops = 16`, attrs never read


def is_vision(genai_config: dict) -> bool:
    """An image + text artifact: its genai_config has a vision model (type phi3v)."""
    return "vision" in (genai_config.get("model") or {})


def load_image(path: Path) -> Image.Image:
    """The image at ``path``, decoded and converted to RGB; anything PIL cannot decode is one line."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise Phi3ExportError(f"{path}: no such image file")
    try:
        with Image.open(path) as probe:
            probe.verify()  # structure and checksums: a truncated or corrupt PNG fails here or on load
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise Phi3ExportError(f"{path}: not an image file PIL can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Phi3ExportError(f"{path}: corrupt or unreadable image ({reason})") from None


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class ProcessorFacts:
    """What the artifact's processor_config.json says: crops per image and tokens per crop."""

    num_crops: int
    num_img_tokens: int

    @property
    def side(self) -> int:
        return round(self.num_img_tokens ** 0.5)

    def image_tokens(self, height: int, width: int, crop: int = 336) -> int:
        """Placeholder tokens of one HD image ``height`` x ``width`` (ImageEmbedding.image_tokens)."""
        rows, cols = int(height) // crop, int(width) // crop
        return (rows * cols + 1) * self.num_img_tokens + 1 + (rows + 1) * self.side


def vision_input_dtype(folder: Path) -> type:
    """The dtype vision.onnx declares for pixel_values (float16 on dml), read from the graph only."""
    import onnx

    from phi3_export.paths import inside

    name = read_json(Path(folder) / "genai_config.json")["model"]["vision"]["filename"]
    graph = onnx.load(str(inside(Path(folder), name, "genai_config.json: model.vision.filename")), load_external_data=False).graph
    pixels = next(i for i in graph.input if i.name == "pixel_values")
    return np.float16 if pixels.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32


def processor_facts(folder: Path) -> ProcessorFacts:
    path = Path(folder) / PROCESSOR_CONFIG
    if not path.is_file():
        raise Phi3ExportError(f"{folder}: no {PROCESSOR_CONFIG} (an image + text artifact needs it for image prompts; "
                              "re-export the artifact)")
    doc = read_json(path)
    transforms = ((doc.get("processor") or {}).get("transforms") or []) if isinstance(doc, dict) else []
    for entry in transforms:
        op = (entry or {}).get("operation") or {}
        if op.get("type") == TRANSFORM_OP:
            attrs = op.get("attrs") or {}
            crops, tokens = attrs.get("num_crops"), attrs.get("num_img_tokens", 144)
            if not isinstance(crops, int) or crops < 1 or not isinstance(tokens, int) or tokens < 1:
                raise Phi3ExportError(f"{path}: {TRANSFORM_OP} needs attrs num_crops and num_img_tokens >= 1 "
                                      f"(has {json.dumps(attrs)})")
            return ProcessorFacts(crops, tokens)
    raise Phi3ExportError(f"{path}: no {TRANSFORM_OP} operation (not a Phi-3-vision processor config)")


def tagged(prompt: str, count: int) -> str:
    """The user message with ``<|image_k|>`` tags: prepended (one per line) unless it has them;
    tags it has must be exactly 1..count."""
    found = [int(k) for k in TAG.findall(prompt)]
    if not found:
        return "".join(f"<|image_{k}|>\n" for k in range(1, count + 1)) + prompt
    if sorted(set(found)) != list(range(1, count + 1)) or len(found) != count:
        raise Phi3ExportError(f"--prompt: image tags {', '.join(f'<|image_{k}|>' for k in found)} do not match "
                              f"{count} --image file(s): give each of <|image_1|> .. <|image_{count}|> once, or no tags")
    return prompt


@dataclass
class PromptInputs:
    """One image prompt's runtime inputs and what they hold."""

    tensors: object  # og.NamedTensors
    ids: np.ndarray  # int64 [1, S]: text ids and -k runs
    pixel_values: np.ndarray
    image_sizes: np.ndarray
    image_tokens: list[int]  # per image
    processor: str  # "own" | "runtime"

    @property
    def crops(self) -> int:
        """Crop slots per image in pixel_values (num_crops + 1)."""
        return int(self.pixel_values.shape[1])


class ImagePrompts:
    """Builds image-prompt inputs for one loaded phi3v model (module docstring)."""

    def __init__(self, og, model, folder: Path):
        self.og, self.model, self.folder = og, model, Path(folder)
        self.facts = processor_facts(folder)  # before the runtime: its own error is "failed to open"
        self.processor = model.create_multimodal_processor()
        self.pixel_dtype = vision_input_dtype(self.folder)

    def text_ids(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, np.int64)
        return self.processor(text)["input_ids"].as_numpy().reshape(-1).astype(np.int64)

    def own(self, prompt: str, images: list[Image.Image], num_crops: int | None = None) -> PromptInputs:
        """Our HD transform at the artifact's crop count (or ``num_crops``), hand-built NamedTensors."""
        from phi3_export.arch.hd_transform import hd_transform

        pixel_values, image_sizes = hd_transform(images, num_crops or self.facts.num_crops)
        tokens = [self.facts.image_tokens(h, w) for h, w in image_sizes]
        chunks = TAG.split(prompt)  # text, k, text, k, ..., text
        parts = [self.text_ids(chunks[0])]
        for k, text in zip(chunks[1::2], chunks[2::2]):
            index = int(k)
            if not 1 <= index <= len(images):
                raise Phi3ExportError(f"--prompt: <|image_{index}|> but {len(images)} image(s) given")
            parts += [np.full(tokens[index - 1], -index, np.int64), self.text_ids(text)]
        ids = np.concatenate(parts)[None]
        return self._inputs(ids, pixel_values, image_sizes, tokens, "own")

    def runtime(self, prompt: str, images: list[Image.Image]) -> PromptInputs:
        """onnxruntime-genai's own processor (PNG bytes of the PIL-checked images)."""
        inputs = self.processor(prompt, images=self.og.Images.open_bytes(*(png_bytes(i) for i in images)))
        names = inputs.keys()  # og.NamedTensors: not iterable itself
        arrays = {k: inputs[k].as_numpy() for k in names}
        tokens = [int(n) for n in arrays["num_image_tokens"].reshape(-1)]
        return PromptInputs(inputs, arrays["input_ids"].astype(np.int64), arrays["pixel_values"], arrays["image_sizes"],
                            tokens, "runtime")

    def _inputs(self, ids, pixel_values, image_sizes, tokens, processor) -> PromptInputs:
        nt = self.og.NamedTensors()
        nt["input_ids"] = ids.astype(np.int32)
        nt["pixel_values"] = np.ascontiguousarray(pixel_values, self.pixel_dtype)  # fp16 on dml, as the runtime's processor
        nt["image_sizes"] = np.ascontiguousarray(image_sizes, np.int64)
        # Required: without it the runtime never runs the vision model (study, finding 2).
        nt["num_image_tokens"] = np.asarray(tokens, np.int64).reshape(-1, 1)
        return PromptInputs(nt, ids, pixel_values, image_sizes, tokens, processor)

    def build(self, prompt: str, images: list[Image.Image], runtime_processor: bool = False) -> PromptInputs:
        return self.runtime(prompt, images) if runtime_processor else self.own(prompt, images)


def sample_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: smooth gradients plus a little noise (not flat: crops differ)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 128 + 100 * np.sin((x + y) / 23.0)
    pixels = np.stack([r, g, b], -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
