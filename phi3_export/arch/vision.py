"""Plan components of an image + text model (Phi-3-vision, Phi-3.5-vision): what every stage walks.

A vision model's plan is the text decoder's (``ModelPlan.decoder``, fed ``inputs_embeds``)
plus ``ModelPlan.image``, an ``ImageEmbedding``:

    pixel_values [images, crops + 1, 3, 336, 336] (global image first, then the HD sub-crops)
      -> ClipEncoder: patch 14 conv, class token, positions, pre-LayerNorm, encoder layers
         (the output of layer ``len(layers) - 1``: the published model reads hidden_states[-2])
      -> drop the class token, merge 2 x 2 patches (24 x 24 -> 12 x 12 tokens of 4 x width)
      -> per image: sub-crop grid rows each closed by ``sub_separator``, ``global_separator``,
         then the global image's rows each closed by ``sub_separator``
      -> projector: Linear -> GELU (erf) -> Linear, to the decoder's hidden size
    embedding: token ids (image placeholders are negative ids, -k for image k) + image features
      -> inputs_embeds: text rows gathered from the decoder's embedding table, placeholder rows
         filled with the image features in order.

Tensors are named by their checkpoint names. Image tokens of an HD image of h x w pixels
(multiples of 336): ``(h/336 * w/336 + 1) * 144 + 1 + (h/336 + 1) * 12``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from phi3_export.arch.plan import Linear, Norm


@dataclass(frozen=True)
class ClipLayer:
    """One pre-norm CLIP encoder layer: x + o(attn(ln1 x)); then x + fc2(quick_gelu(fc1(ln2 x)))."""

    index: int
    prefix: str
    norm1: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    norm2: Norm
    fc1: Linear
    fc2: Linear

    def linears(self) -> tuple[Linear, ...]:
        return (self.q, self.k, self.v, self.o, self.fc1, self.fc2)

    def tensors(self) -> tuple[str, ...]:
        names: list[str] = []
        for block in (self.norm1, *self.linears()[:4], self.norm2, self.fc1, self.fc2):
            names.extend(block.tensors())
        return tuple(names)


@dataclass(frozen=True)
class ClipEncoder:
    """A CLIP ViT image tower; ``layers`` are the ones the feature read needs (hidden_states[-2]:
    all but the last). ``unused``: checkpoint tensors of the tower the model never reads (the last
    layer, post_layernorm), each declared where the plan is built."""

    hidden: int
    heads: int
    intermediate: int
    image_size: int
    patch: int
    class_embedding: str  # [hidden]
    patch_embedding: str  # [hidden, 3, patch, patch], no bias
    position_embedding: str  # [(image_size / patch)^2 + 1, hidden]
    pre_norm: Norm
    layers: tuple[ClipLayer, ...]
    activation: Literal["quick_gelu"] = "quick_gelu"
    unused: tuple[str, ...] = ()

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class ImageEmbedding:
    """Phi-3-vision's HD image embedding (module docstring). ``merge`` x ``merge`` patches become one
    token of ``merge**2 * encoder.hidden`` channels; ``projector`` is (Linear, Linear) with a GELU between."""

    kind: Literal["phi3v-hd"]
    encoder: ClipEncoder
    sub_separator: str  # [1, 1, 1, merge^2 * hidden]: closes every row of tokens
    global_separator: str  # [1, 1, merge^2 * hidden]: between the sub-crops and the global image
    projector: tuple[Linear, Linear]
    merge: int = 2

    @property
    def crop_size(self) -> int:
        return self.encoder.image_size

    @property
    def side(self) -> int:
        """Tokens per side of one crop after the merge (12)."""
        return self.encoder.grid // self.merge

    @property
    def tokens_per_crop(self) -> int:
        return self.side * self.side

    @property
    def merged_width(self) -> int:
        return self.merge * self.merge * self.encoder.hidden

    def image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens of one HD-transformed image of ``height`` x ``width`` pixels."""
        rows, cols = height // self.crop_size, width // self.crop_size
        return (rows * cols + 1) * self.tokens_per_crop + 1 + (rows + 1) * self.side

    def most_image_tokens(self, num_crops: int) -> int:
        """The most placeholder tokens one image can take at ``num_crops``: a tall image, one crop wide
        (only the sub-crop grid's rows get separators)."""
        return self.image_tokens(num_crops * self.crop_size, self.crop_size)

    def tensors(self) -> tuple[str, ...]:
        enc = self.encoder
        names = [enc.class_embedding, enc.patch_embedding, enc.position_embedding, *enc.pre_norm.tensors()]
        for layer in enc.layers:
            names.extend(layer.tensors())
        names += [self.sub_separator, self.global_separator]
        for lin in self.projector:
            names.extend(lin.tensors())
        return tuple(names)
