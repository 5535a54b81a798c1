"""Checkpoint checks before anything is written: config, tensors, recipe, memory.

Recipe against checkpoint: the checkpoint's config.json is the authority on facts.

Features (architecture, RoPE kind, partial rotary, tied embeddings, sliding window, GQA
ratio) must always agree. Dimensions must agree too, except for a test fixture that
records which recipe it scales down. A recipe value of ``from-checkpoint`` is not checked.
"""

from __future__ import annotations

import os
from typing import Any

from phi3_export.arch import Architecture, architecture
from phi3_export.arch.plan import ModelPlan
from phi3_export.arch.vision import ImageEmbedding
from phi3_export.checkpoint.config import architecture_name, check_config, intermediate_size, rope_settings
from phi3_export.checkpoint.reader import FLOAT_DTYPES, Checkpoint
from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json
from phi3_export.paths import inside
from phi3_export.recipes.schema import FROM_CHECKPOINT, ModelFacts, Recipe

FEATURES = ("architecture", "rope.kind", "rope.partial_rotary_factor", "tie_word_embeddings", "sliding_window", "gqa_ratio",
            "experts_per_token", "blocksparse.dense_attention_every_n_layers", "blocksparse.homo_head_pattern")
DIMS = (
    "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
    "context_length", "original_context_length", "rope.theta", "tokenizer", "num_experts",
    "blocksparse.block_size", "blocksparse.num_local_blocks", "blocksparse.vert_stride",
)


def _get(facts: ModelFacts, field: str) -> object:
    if field == "gqa_ratio":
        if FROM_CHECKPOINT in (facts.num_heads, facts.num_kv_heads):
            return FROM_CHECKPOINT
        return facts.num_heads // facts.num_kv_heads
    value: object = facts
    for part in field.split("."):
        if value is None:  # a block the model does not have (no blocksparse facts)
            return None
        value = getattr(value, part)
    return value


def mismatches(recipe: ModelFacts, checkpoint: ModelFacts, *, dims: bool) -> list[tuple[str, object, object]]:
    fields = FEATURES + (DIMS if dims else ())
    out = []
    for field in fields:
        want, have = _get(recipe, field), _get(checkpoint, field)
        if want != FROM_CHECKPOINT and want != have:
            out.append((field, want, have))
    return out


def check_recipe(recipe: Recipe, facts: ModelFacts, *, is_fixture_of_recipe: bool, source: str) -> None:
    """Raise a one-line error naming every disagreeing field with both values."""
    bad = mismatches(recipe.model, facts, dims=not is_fixture_of_recipe)
    if bad:
        field, want, have = bad[0]
        others = "; ".join(f"model.{f} {w!r} vs {h!r}" for f, w, h in bad[1:])
        more = f" (also {others})" if others else ""
        raise Phi3ExportError(
            f"{source}: recipe {recipe.name} does not match the checkpoint: "
            f"model.{field} is {want!r} in the recipe but {have!r} in config.json{more}"
        )


def matching_recipes(recipes: list[Recipe], facts: ModelFacts) -> list[Recipe]:
    return [r for r in recipes if not mismatches(r.model, facts, dims=True)]


def expected_tensors(plan: ModelPlan) -> dict[str, tuple[int, ...]]:
    """Every tensor the plan reads, with the shape config.json implies."""
    d = plan.decoder
    shapes: dict[str, tuple[int, ...]] = {d.embedding: (d.vocab, d.hidden)}
    norms = [n for layer in d.layers for n in layer.norms()] + [d.final_norm]
    linears = [lin for layer in d.layers for lin in layer.linears()] + ([] if d.tied else [d.lm_head])
    for norm in norms:
        shapes.update({name: (d.hidden,) for name in norm.tensors()})
    for lin in linears:
        shapes[lin.weight] = lin.shape
        if lin.bias:
            shapes[lin.bias] = (lin.shape[0],)
    if plan.image is not None:
        shapes.update(image_tensor_shapes(plan.image))
    return shapes


def image_tensor_shapes(image: ImageEmbedding) -> dict[str, tuple[int, ...]]:
    """The image embedding's tensors (arch/vision.py) with the shapes its dimensions imply."""
    enc = image.encoder
    shapes: dict[str, tuple[int, ...]] = {
        enc.class_embedding: (enc.hidden,),
        enc.patch_embedding: (enc.hidden, 3, enc.patch, enc.patch),
        enc.position_embedding: (enc.grid * enc.grid + 1, enc.hidden),
        image.sub_separator: (1, 1, 1, image.merged_width),
        image.global_separator: (1, 1, image.merged_width),
    }
    norms = [enc.pre_norm] + [n for layer in enc.layers for n in (layer.norm1, layer.norm2)]
    for norm in norms:
        shapes.update({name: (enc.hidden,) for name in norm.tensors()})
    for lin in [lin for layer in enc.layers for lin in layer.linears()] + list(image.projector):
        shapes[lin.weight] = lin.shape
        if lin.bias:
            shapes[lin.bias] = (lin.shape[0],)
    return shapes


def check_tensors(ckpt: Checkpoint, plan: ModelPlan) -> None:
    """Before anything is written: every tensor the plan needs is there, with its shape and a float
    dtype; nothing unknown is."""
    source = ckpt.folder / "config.json"
    expected = expected_tensors(plan)
    missing = [name for name in expected if name not in ckpt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Phi3ExportError(f"{ckpt.folder}: tensor {missing[0]!r}{more} is missing: {source} describes "
                              f"{len(plan.decoder.layers)} layers of {plan.architecture}")
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise Phi3ExportError(f"{ckpt.folder}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                                  f"but {source} implies {list(shape)}")
        dtype = ckpt.dtype_name(name)
        if dtype not in FLOAT_DTYPES:
            hint = "dequantize the checkpoint first" if dtype[0] in "IUB" else "convert the checkpoint to one of them"
            raise Phi3ExportError(f"{ckpt.shard_of(name)}: tensor {name!r} is {dtype}: phi3-export reads "
                                  f"{'/'.join(FLOAT_DTYPES)} weights; {hint}")
    extra = [name for name in ckpt.names if name not in expected and name not in plan.ignorable]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise Phi3ExportError(f"{ckpt.folder}: tensor {extra[0]!r}{more} is not part of the model {source} describes")


def checked_architecture(ckpt: Checkpoint) -> type[Architecture]:
    """The checkpoint's architecture module, once config.json has passed ``check_config`` and a
    tokenizer is there: call before any fact or plan is built from the config."""
    source = ckpt.folder / "config.json"
    arch = architecture(architecture_name(ckpt.config, source), source=str(source))
    check_config(ckpt.config, source, required=getattr(arch, "config_required", ()), fixed=getattr(arch, "config_fixed", None))
    _resolve_tokenizer(ckpt, arch)
    return arch


def _resolve_tokenizer(ckpt: Checkpoint, arch: type[Architecture]) -> None:
    """The checkpoint's own tokenizer, else one built from tiktoken ranks where the architecture
    declares its tokenizer is (``tiktoken_tokenizer``, a checkpoint/tiktoken.py SPECS name)."""
    from phi3_export.checkpoint.tiktoken import SPECS

    spec_name = getattr(arch, "tiktoken_tokenizer", None)
    spec = SPECS[spec_name] if spec_name else None
    if ckpt.tiktoken_file is not None:
        if spec is None:
            raise Phi3ExportError(f"--tiktoken-file {ckpt.tiktoken_file}: {arch.names[0]} checkpoints have no tiktoken tokenizer")
        if (ckpt.folder / "tokenizer.json").is_file():
            raise Phi3ExportError(f"--tiktoken-file {ckpt.tiktoken_file}: {ckpt.folder} has its own tokenizer.json "
                                  "(used as it is): drop --tiktoken-file")
    if ckpt.tokenizer_folder != ckpt.folder or (ckpt.tokenizer_kind != "unknown" and ckpt.tiktoken_file is None):
        return  # built already, or the folder's own
    if spec is not None:
        ckpt.use_tiktoken(spec)
        return
    raise Phi3ExportError(f"{ckpt.folder}: no tokenizer.json (nor a sentencepiece tokenizer.model): "
                          "the artifacts need the model's tokenizer")


# ---- memory, estimated from config.json before anything is allocated ------------------------

RUNTIME_BYTES = 400 << 20  # python, torch, onnx and their libraries
ROW_BLOCK_BYTES = 2 * 4 * (1 << 21)  # quant/store.py CHUNK_ELEMENTS in fp32, and the block being quantized


def physical_memory() -> int:
    """Bytes of RAM of this machine (``os.sysconf``); 0 where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def peak_memory_terms(config: dict[str, Any], *, max_length: int, calibration: tuple[int, int] | None = None) -> dict[str, int]:
    """A lower estimate of the export's peak memory, by what it is for (bytes); ``config`` has passed ``check_config``.

    - ``layer``: one decoder layer (the stages stream one at a time): its weights as read from
      the checkpoint (2 bytes each), or, for AWQ, the fp32 copy it searches plus the float module;
    - ``embedding``: the embedding table, read whole where it is stored float, and the row
      blocks quantized at a time;
    - ``rope``: the RoPE cos/sin tables sized by max_length (with their temporaries and the
      graph's copy; twice for LongRoPE's short and long tables);
    - ``calibration`` (AWQ, ``(samples, seqlen)``): activations in and out of a layer, every
      linear's captured input, the seqlen x seqlen attention mask.
    """
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter, vocab = intermediate_size(config), config["vocab_size"]
    experts, top_k = config.get("num_local_experts") or 1, config.get("num_experts_per_tok") or 1
    q, kv = heads * head_dim, kv_heads * head_dim
    layer_params = hidden * (q + 2 * kv) + q * hidden + experts * 3 * hidden * inter + (experts * hidden if experts > 1 else 0)
    rope = rope_settings(config)
    rotary_half = int(head_dim * rope["partial_rotary_factor"]) // 2
    terms = {
        "layer": layer_params * (8 if calibration else 2),
        "embedding": vocab * hidden * 2 + ROW_BLOCK_BYTES,
        "rope": max_length * rotary_half * 4 * 4 * (2 if rope["kind"] in ("longrope", "su") else 1),
        "runtime": RUNTIME_BYTES,
    }
    if calibration:
        samples, seqlen = calibration
        tokens = samples * seqlen
        captured = hidden + q + (hidden + inter * min(top_k, experts) if experts > 1 else hidden + inter)
        terms["calibration"] = tokens * (2 * hidden + captured) * 4 + seqlen * seqlen * 4 * 3 + seqlen * head_dim * 4 * 4
    return terms


def check_memory(config: dict[str, Any], source: str, *, max_length: int, calibration: tuple[int, int] | None = None,
                 blame: dict[str, str] | None = None) -> None:
    """Refuse, before any allocation, an export whose estimated peak exceeds this machine's RAM.

    ``blame`` names what to point at for a term (``{"rope": "--max-length 1000000000"}``);
    otherwise the message names ``source`` (config.json) and its dimensions.
    """
    available = physical_memory()
    terms = peak_memory_terms(config, max_length=max_length, calibration=calibration)
    total = sum(terms.values())
    if not available or total <= available:
        return
    worst = max(terms, key=terms.get)
    what = {
        "layer": f"one decoder layer (hidden_size {config['hidden_size']}, intermediate_size {intermediate_size(config)}"
                 + (f", {config['num_local_experts']} experts" if config.get("num_local_experts") else "") + ")",
        "embedding": f"the embedding table (vocab_size {config['vocab_size']} x hidden_size {config['hidden_size']})",
        "rope": f"RoPE tables for max_length {max_length}",
        "calibration": "AWQ calibration activations" + (f" ({calibration[0]} samples x {calibration[1]} tokens)" if calibration else ""),
        "runtime": "the runtime",
    }[worst]
    where = (blame or {}).get(worst, source)
    raise Phi3ExportError(f"{where}: the export would need about {_gb(total)} of memory ({_gb(terms[worst])} for {what}), "
                          f"more than this machine's {_gb(available)}")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 1 << 50 else f"{n / 2**40:.3g} TiB"


def check_image_processor(ckpt: Checkpoint, recipe: Recipe, plan: ModelPlan) -> None:
    """An image model's crop count: the checkpoint's preprocessor_config.json (where it has one)
    and the recipe's export.vision.num_crops must agree, or the artifact would embed images
    another way than the model was trained to see them."""
    path = ckpt.folder / "preprocessor_config.json"
    if plan.image is None or not path.is_file():
        return
    doc = read_json(inside(ckpt.folder, path.name, str(path)))
    crops = doc.get("num_crops")
    if crops is not None and crops != recipe.export.vision.num_crops:
        raise Phi3ExportError(f"{path}: num_crops {crops!r}, but recipe {recipe.name} says export.vision.num_crops "
                              f"{recipe.export.vision.num_crops}: use a recipe for this model (or set it there)")
