"""Recipes: the typed schema and the loader."""

from phi3_export.recipes.loader import list_recipes, load_recipe, parse_recipe, recipes_dir
from phi3_export.recipes.schema import FROM_CHECKPOINT, ModelFacts, Recipe

__all__ = ["FROM_CHECKPOINT", "ModelFacts", "Recipe", "list_recipes", "load_recipe", "parse_recipe", "recipes_dir"]
