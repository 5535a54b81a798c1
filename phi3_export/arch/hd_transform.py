"""Phi-3-vision's HD image transform, as onnxruntime-genai 0.18's image processor computes it.

Published algorithm (``image_processing_phi3_v.py::HD_transform``) with the runtime's
resampling, measured against ``create_multimodal_processor`` (notes/phi3v-study.md §2, trap 6):

- the HD size: with the long side horizontal (``w >= h``; a tall image is transposed for the
  arithmetic only), ``scale`` is the largest integer with ``scale * ceil(scale / ratio) <=
  num_crops``; the image is resized to ``new_w = scale * 336``, ``new_h = int(new_w / ratio)``
  with PIL bilinear (the runtime resizes the image as it is, not transposed: a tall image
  rounds as its own orientation does), then padded with white, centred (``top = (tar - new) // 2``),
  to a multiple of 336 on the short side;
- normalised ``(x / 255 - mean) / std`` with CLIP's mean and std, channels first;
- sub-crops: the HD image cut row-major into 336 x 336 crops;
- the global image: the *normalised* HD image resized to 336 x 336 with antialiased bicubic
  (the runtime's; the published HF processor uses bicubic without antialias, up to 1.6 apart);
- ``pixel_values[i] = [global, crop_0 .. crop_k-1, zero crops ...]``, ``num_crops + 1`` slots;
  ``image_sizes[i] = [H, W]`` of the HD image (height first).

Deviation from the published code, where it fails: an extreme aspect ratio at a small crop
count can give ``new_h = int(336 / ratio) = 0`` (10 x 4000 at 1 crop); the resize keeps 1 pixel.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

    from phi3_export.arch.vision import ImageEmbedding

CROP = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD = (255, 255, 255)


def hd_size(width: int, height: int, num_crops: int, crop: int = CROP) -> tuple[int, int, int, int]:
    """``(resized_w, resized_h, hd_w, hd_h)`` of an image of ``width`` x ``height`` pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image of {width} x {height} pixels")
    transposed = width < height
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale = max(1, scale - 1)
    new_w = scale * crop
    new_h = max(1, int(new_w / ratio))
    padded = math.ceil(new_h / crop) * crop
    if transposed:
        return new_h, new_w, padded, new_w
    return new_w, new_h, new_w, padded


def hd_image(image: Image.Image, num_crops: int) -> Image.Image:
    """The RGB HD image: bilinear resize, then centred white padding to multiples of 336."""
    from PIL import Image

    image = image.convert("RGB")
    rw, rh, hw, hh = hd_size(image.width, image.height, num_crops)
    resized = image.resize((rw, rh), Image.BILINEAR)
    canvas = Image.new("RGB", (hw, hh), PAD)
    canvas.paste(resized, ((hw - rw) // 2, (hh - rh) // 2))
    return canvas


def normalise(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32: ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def crops_of(x: torch.Tensor, crop: int = CROP) -> torch.Tensor:
    """[3, H, W] -> [(H / crop) * (W / crop), 3, crop, crop], row-major."""
    _, h, w = x.shape
    rows, cols = h // crop, w // crop
    return x.reshape(3, rows, crop, cols, crop).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, crop, crop)


def global_image(x: torch.Tensor, crop: int = CROP) -> torch.Tensor:
    """[3, H, W] normalised -> [3, crop, crop]: antialiased bicubic, as the runtime resizes."""
    out = torch.nn.functional.interpolate(x[None], size=(crop, crop), mode="bicubic", align_corners=False, antialias=True)
    return out[0]


def hd_transform(images: list[Image.Image], num_crops: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values float32 [n, num_crops + 1, 3, 336, 336], image_sizes int64 [n, 2])`` (module docstring)."""
    if num_crops < 1:
        raise ValueError(f"num_crops {num_crops}: at least 1")
    pixel_values = np.zeros((len(images), num_crops + 1, 3, CROP, CROP), dtype=np.float32)
    image_sizes = np.zeros((len(images), 2), dtype=np.int64)
    for i, image in enumerate(images):
        hd = hd_image(image, num_crops)
        x = normalise(hd)
        crops = crops_of(x)
        if len(crops) > num_crops:  # cannot happen by the scale rule; a guard against a changed one
            raise AssertionError(f"{len(crops)} crops for num_crops {num_crops}")
        pixel_values[i, 0] = global_image(x).numpy()
        pixel_values[i, 1 : 1 + len(crops)] = crops.numpy()
        image_sizes[i] = (hd.height, hd.width)
    return pixel_values, image_sizes


def image_tokens(plan_image: ImageEmbedding, height: int, width: int) -> int:
    """Placeholder tokens of one HD image of ``height`` x ``width`` (its ``image_sizes`` row)."""
    return plan_image.image_tokens(int(height), int(width))
