"""Phi3VForCausalLM: Phi-3-vision-128k and Phi-3.5-vision (image + text; published as remote code only).

The text decoder is Phi-3's (arch/phi3.py: Phi-3-mini-128k / Phi-3.5-mini), fed inputs_embeds.
The image embedding (arch/vision.py) is a CLIP ViT-L/14 at 336 px under
``model.vision_embed_tokens.img_processor.vision_model.`` read at hidden_states[-2], a 2 x 2
patch merge, the learnt ``sub_GN`` / ``glb_GN`` separators and a two-layer projector
``img_projection.0`` -> GELU -> ``img_projection.2``. config.json carries the blocks
``embd_layer`` (HD transform, ``sub_glb`` order) and ``img_processor`` (``image_dim_out``,
``num_img_tokens`` 144, optionally ``layer_idx`` -2). Facts: shared/reference/family-next.md.
"""

from __future__ import annotations

from typing import Any

from phi3_export.arch.phi3 import Phi3
from phi3_export.arch.plan import Linear, ModelPlan, Norm
from phi3_export.arch.registry import register
from phi3_export.arch.vision import ClipEncoder, ClipLayer, ImageEmbedding
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.schema import ModelFacts

PREFIX = "model.vision_embed_tokens."
CLIP = PREFIX + "img_processor.vision_model."
# The published code hard-codes the image tower (CLIP ViT-L/14-336) instead of configuring it;
# a config.json may give it in ``img_processor.clip`` (our tiny fixtures do: shapes alone
# cannot tell the head count).
CLIP_VIT_L_14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "image_size": 336, "patch_size": 14, "layer_norm_eps": 1e-5}


def clip_settings(config: dict[str, Any]) -> dict[str, Any]:
    block = config.get("img_processor") or {}
    return {**CLIP_VIT_L_14_336, **(block.get("clip") or {})}


def feature_layer(config: dict[str, Any]) -> int:
    """How many encoder layers the feature read runs: hidden_states[layer_idx] (published -2)."""
    clip = clip_settings(config)
    layer_idx = (config.get("img_processor") or {}).get("layer_idx", -2)
    count = clip["num_hidden_layers"] + 1 + layer_idx if layer_idx < 0 else layer_idx
    if not 0 < count <= clip["num_hidden_layers"]:
        raise Phi3ExportError(f"config.json: img_processor.layer_idx: {layer_idx} reads no encoder layer of "
                              f"{clip['num_hidden_layers']}")
    return count


# config.json values the published code supports only exactly (it asserts most of them): the
# runtime's processor hard-codes 336-px crops of 14-px patches, merged 2 x 2 into 144 tokens.
SUPPORTED = {("embd_layer", "hd_transform_order"): "sub_glb", ("embd_layer", "use_hd_transform"): True,
             ("embd_layer", "with_learnable_separator"): True, ("embd_layer", "projection_cls"): "mlp",
             ("img_processor", "type_feature"): "patch", ("img_processor", "num_img_tokens"): 144}


def check_image_config(config: dict[str, Any]) -> None:
    """One line naming the key when config.json asks for an image embedding this plan does not build."""
    for (block, key), want in SUPPORTED.items():
        value = (config.get(block) or {}).get(key, want)
        if value != want:
            raise Phi3ExportError(f"config.json: {block}.{key}: {value!r} is not supported (the published model uses {want!r})")
    clip = clip_settings(config)
    if (clip["image_size"], clip["patch_size"]) != (336, 14):
        raise Phi3ExportError(f"config.json: img_processor.clip: image {clip['image_size']} / patch {clip['patch_size']}: "
                              "onnxruntime-genai's image processor makes 336-px crops of 14-px patches")
    if clip["hidden_size"] % clip["num_attention_heads"]:
        raise Phi3ExportError(f"config.json: img_processor.clip: {clip['num_attention_heads']} heads do not divide "
                              f"hidden size {clip['hidden_size']}")
    dim_out = (config.get("img_processor") or {}).get("image_dim_out", clip["hidden_size"])
    if dim_out != clip["hidden_size"]:
        raise Phi3ExportError(f"config.json: img_processor.image_dim_out: {dim_out} is not the image tower's width "
                              f"{clip['hidden_size']}")


def image_embedding(config: dict[str, Any]) -> ImageEmbedding:
    check_image_config(config)
    clip = clip_settings(config)
    hidden, inter, eps = clip["hidden_size"], clip["intermediate_size"], float(clip["layer_norm_eps"])
    text_hidden = config["hidden_size"]

    def norm(path: str) -> Norm:
        return Norm("layer", f"{path}.weight", eps, bias=f"{path}.bias")

    def linear(path: str, role: str, shape: tuple[int, int]) -> Linear:
        return Linear(f"{path}.weight", role, shape, bias=f"{path}.bias")

    def layer(i: int) -> ClipLayer:
        p = f"{CLIP}encoder.layers.{i}."
        return ClipLayer(i, p, norm(f"{p}layer_norm1"),
                         *(linear(f"{p}self_attn.{x}_proj", f"vision_{x}_proj", (hidden, hidden)) for x in ("q", "k", "v", "out")),
                         norm(f"{p}layer_norm2"), linear(f"{p}mlp.fc1", "vision_fc1", (inter, hidden)),
                         linear(f"{p}mlp.fc2", "vision_fc2", (hidden, inter)))

    used = feature_layer(config)
    # hidden_states[-2] is the output of all but the last encoder layer: that layer and the
    # post-layernorm are in the checkpoint and never read.
    unused = tuple(name for i in range(used, clip["num_hidden_layers"]) for name in layer(i).tensors())
    unused += (f"{CLIP}post_layernorm.weight", f"{CLIP}post_layernorm.bias")
    encoder = ClipEncoder(
        hidden=hidden, heads=clip["num_attention_heads"], intermediate=inter, image_size=clip["image_size"],
        patch=clip["patch_size"], class_embedding=f"{CLIP}embeddings.class_embedding",
        patch_embedding=f"{CLIP}embeddings.patch_embedding.weight", position_embedding=f"{CLIP}embeddings.position_embedding.weight",
        pre_norm=norm(f"{CLIP}pre_layrnorm"),  # sic: the published (and transformers') name
        layers=tuple(layer(i) for i in range(used)), unused=unused,
    )
    merged = 4 * hidden
    projector = (linear(f"{PREFIX}img_projection.0", "vision_projection_0", (text_hidden, merged)),
                 linear(f"{PREFIX}img_projection.2", "vision_projection_2", (text_hidden, text_hidden)))
    return ImageEmbedding("phi3v-hd", encoder, sub_separator=f"{PREFIX}sub_GN", global_separator=f"{PREFIX}glb_GN",
                          projector=projector)


@register
class Phi3V(Phi3):  # the text decoder is Phi-3's: facts, layers, weight count, calibration
    names = ("Phi3VForCausalLM",)

    @classmethod
    def facts_from_config(cls, config: dict[str, Any], tokenizer_kind: str) -> ModelFacts:
        return Phi3.facts_from_config({**config, "model_type": config.get("model_type") or "phi3_v"}, tokenizer_kind)

    @classmethod
    def plan(cls, config: dict[str, Any]) -> ModelPlan:
        text = Phi3.plan(config)
        image = image_embedding(config)
        # Aliases some checkpoints carry: the decoder's table seen through the image embedding
        # (``wte``), and CLIP's position-id buffer; neither is a weight of its own.
        aliases = (f"{PREFIX}wte.weight", f"{CLIP}embeddings.position_ids")
        return ModelPlan(
            architecture=config["architectures"][0], decoder=text.decoder, genai_type="phi3v", image=image,
            refused_formats={fmt: f"the image encoder has no {runtime} program yet (the text decoder alone would not "
                                  "answer image prompts)" for fmt, runtime in (("coreml", "Core ML"), ("coreai", "Core AI"))},
            ignorable=text.ignorable + image.encoder.unused + aliases,
        )
