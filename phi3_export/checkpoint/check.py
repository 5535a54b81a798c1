"""Recipe against checkpoint: the checkpoint's config.json is the authority on facts.

Features (architecture, RoPE kind, partial rotary, tied embeddings, sliding window, GQA
ratio) must always agree. Dimensions must agree too, except for a test fixture that
records which recipe it scales down. A recipe value of ``from-checkpoint`` is not checked.
"""

from __future__ import annotations

from phi3_export.arch.plan import ModelPlan
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.schema import FROM_CHECKPOINT, ModelFacts, Recipe

FEATURES = ("architecture", "rope.kind", "rope.partial_rotary_factor", "tie_word_embeddings", "sliding_window", "gqa_ratio",
            "experts_per_token")
DIMS = (
    "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
    "context_length", "original_context_length", "rope.theta", "tokenizer", "num_experts",
)


def _get(facts: ModelFacts, field: str) -> object:
    if field == "gqa_ratio":
        if FROM_CHECKPOINT in (facts.num_heads, facts.num_kv_heads):
            return FROM_CHECKPOINT
        return facts.num_heads // facts.num_kv_heads
    value: object = facts
    for part in field.split("."):
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
    return shapes


def check_tensors(ckpt: Checkpoint, plan: ModelPlan) -> None:
    """Before anything is written: every tensor the plan needs is there, with its shape; nothing unknown is."""
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
    extra = [name for name in ckpt.names if name not in expected and name not in plan.ignorable]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise Phi3ExportError(f"{ckpt.folder}: tensor {extra[0]!r}{more} is not part of the model {source} describes")
