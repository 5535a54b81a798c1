"""The torch reference of Phi-3-vision's image embedding (plan ``ImageEmbedding``, arch/vision.py).

Built on transformers' ``CLIPVisionModel`` (no remote code), configured from the plan's
encoder and loaded from the checkpoint's tensors. Only the encoder layers the feature read
needs are built (``len(encoder.layers)``: the published hidden_states[-2] of 24 layers is the
output of layer 23), so the last layer and ``post_layernorm`` are neither built nor read.

Per image, from its ``image_sizes`` row ``[H, W]`` (``rows = H / 336``, ``cols = W / 336``):

    CLIP over [global, crop_0 .. crop_{rows*cols-1}]  (pixel_values' zero slots are skipped)
    -> hidden_states[len(layers)], class token dropped: [crops, 24*24, C]
    -> 2 x 2 merge: [crops, 12*12, 4C], channels [(r0,c0), (r0,c1), (r1,c0), (r1,c1)] x C
    -> sub-crops as one (rows*12) x (cols*12) grid, each row closed by sub_GN; glb_GN; the
       global image's 12 x 12 grid, each row closed by sub_GN    (order "sub_glb")
    -> projector Linear -> GELU (erf) -> Linear

Features of all images are concatenated in image order; ``embed`` puts them, in order, at the
positions of negative ids (-k for image k), as the published model and onnxruntime-genai do: an
out-of-order tag (``<|image_2|>`` before ``<|image_1|>``) gets the first image's features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from phi3_export.arch.vision import ImageEmbedding


def _tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def merge_patches(x: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """[N, g*g, C] patch features -> [N, (g/merge)^2, merge^2 * C]: each merge x merge block of
    patches becomes one token, channels ordered by (row in block, column in block)."""
    n, count, c = x.shape
    g = math.isqrt(count)
    s = g // merge
    x = x.reshape(n, s, merge, s, merge, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, s * s, merge * merge * c)


def arrange(merged: torch.Tensor, rows: int, cols: int, sub_gn: torch.Tensor, glb_gn: torch.Tensor) -> torch.Tensor:
    """One image's merged crops ``[1 + rows*cols, side*side, D]`` (global first) -> its token rows
    ``[rows*side*(cols*side + 1) + 1 + side*(side + 1), D]``: sub grid with row separators,
    ``glb_gn``, global grid with row separators."""
    _, count, d = merged.shape
    side = math.isqrt(count)
    sub_gn, glb_gn = sub_gn.reshape(1, 1, d), glb_gn.reshape(1, d)

    def grid(crops: torch.Tensor, r: int, c: int) -> torch.Tensor:
        g = crops.reshape(r, c, side, side, d).permute(0, 2, 1, 3, 4).reshape(r * side, c * side, d)
        return torch.cat([g, sub_gn.expand(r * side, 1, d)], dim=1).reshape(-1, d)

    return torch.cat([grid(merged[1 : 1 + rows * cols], rows, cols), glb_gn, grid(merged[:1], 1, 1)], dim=0)


def clip_vision_model(plan_image: ImageEmbedding, tensors: Mapping[str, torch.Tensor], layers: int | None = None) -> nn.Module:
    """transformers' CLIPVisionModel with the plan's dimensions and ``layers`` encoder layers
    (default: the plan's, ``len(encoder.layers)``), loaded from the tower's tensors among the
    checkpoint ``tensors`` (those of deeper layers are left out; ``post_layernorm`` may be absent)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    enc = plan_image.encoder
    layers = len(enc.layers) if layers is None else layers
    eps = enc.pre_norm.eps
    config = CLIPVisionConfig(hidden_size=enc.hidden, intermediate_size=enc.intermediate, num_hidden_layers=layers,
                              num_attention_heads=enc.heads, image_size=enc.image_size, patch_size=enc.patch,
                              hidden_act=enc.activation, layer_norm_eps=eps, num_channels=3)
    config._attn_implementation = "eager"
    model = CLIPVisionModel(config).eval()
    # The tower's prefix in the checkpoint (..img_processor.vision_model.), from a name the plan gives.
    tower = enc.class_embedding.removesuffix("embeddings.class_embedding")
    module_keys = model.state_dict().keys()
    state = {}
    for name in tensors:
        if not name.startswith(tower) or name.endswith("position_ids"):
            continue
        key = name.removeprefix(tower)
        if key not in module_keys and f"vision_model.{key}" in module_keys:
            key = f"vision_model.{key}"
        if key.startswith(("encoder.layers.", "vision_model.encoder.layers.")) and int(key.split("layers.")[1].split(".")[0]) >= layers:
            continue
        state[key] = _tensor(tensors[name]).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "post_layernorm" not in k and "position_ids" not in k]
    if missing or unexpected:
        raise KeyError(f"CLIP tower: tensors missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


class ImageEmbeddingReference(nn.Module):
    """pixel_values + image_sizes -> image features ``[T, hidden]`` (module docstring)."""

    def __init__(self, plan_image: ImageEmbedding, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.plan = plan_image
        self.clip = clip_vision_model(plan_image, tensors)
        self.feature_layer = len(plan_image.encoder.layers)

        def get(name: str) -> torch.Tensor:
            return _tensor(tensors[name]).to(torch.float32)

        self.register_buffer("sub_gn", get(plan_image.sub_separator))
        self.register_buffer("glb_gn", get(plan_image.global_separator))
        first, second = plan_image.projector
        self.projector = nn.Sequential(nn.Linear(first.shape[1], first.shape[0]), nn.GELU(), nn.Linear(second.shape[1], second.shape[0]))
        with torch.no_grad():
            for lin, module in ((first, self.projector[0]), (second, self.projector[2])):
                module.weight.copy_(get(lin.weight))
                if lin.bias:
                    module.bias.copy_(get(lin.bias))
                else:
                    module.bias.zero_()
        self.eval()

    @classmethod
    def from_checkpoint(cls, plan_image: ImageEmbedding, ckpt) -> ImageEmbeddingReference:
        """From a checkpoint/reader.py ``Checkpoint``: reads only the image embedding's tensors."""
        return cls(plan_image, {name: ckpt.tensor(name) for name in plan_image.tensors()})

    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[N, 3, 336, 336] -> [N, grid*grid, hidden]: hidden_states[len(layers)], class token dropped."""
        out = self.clip(pixel_values=crops, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]

    def merged(self, pixel_values, image_sizes) -> torch.Tensor:
        """The features before the projector: ``[T, merge^2 * hidden]``."""
        pixel_values = _tensor(pixel_values).to(torch.float32)
        image_sizes = _tensor(image_sizes).to(torch.int64).reshape(-1, 2)
        crop = self.plan.crop_size
        parts = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            rows, cols = h // crop, w // crop
            if rows * cols + 1 > pixel_values.shape[1]:
                raise ValueError(f"image {i}: image_sizes [{h}, {w}] needs {rows * cols + 1} crops, "
                                 f"pixel_values has {pixel_values.shape[1]}")
            feats = merge_patches(self.clip_features(pixel_values[i, : 1 + rows * cols]), self.plan.merge)
            parts.append(arrange(feats, rows, cols, self.sub_gn, self.glb_gn))
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def forward(self, pixel_values, image_sizes) -> torch.Tensor:
        """pixel_values [n, crops + 1, 3, 336, 336], image_sizes [n, 2] ([H, W]) -> features [T, hidden]."""
        return self.projector(self.merged(pixel_values, image_sizes))

    @staticmethod
    def embed(input_ids, features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """inputs_embeds: rows of ``table`` for ids >= 0; the negative ids' positions, in sequence
        order, take the rows of ``features`` in order (all of them: counts must agree)."""
        ids = _tensor(input_ids).to(torch.int64)
        table = _tensor(table)
        is_image = ids < 0
        count = int(is_image.sum())
        if count != features.shape[0]:
            raise ValueError(f"{count} image placeholder ids but {features.shape[0]} image feature rows")
        out = table[ids.clamp(min=0)].clone()
        out[is_image] = features.to(out.dtype)
        return out
