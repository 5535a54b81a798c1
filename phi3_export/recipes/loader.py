"""Find, read and validate recipes, with errors that point at the file and line."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from phi3_export.errors import Phi3ExportError
from phi3_export.recipes.schema import Recipe


def recipes_dir() -> Path:
    """The shipped recipes: `recipes/` at the repository root (override: PHI3_EXPORT_RECIPES)."""
    override = os.environ.get("PHI3_EXPORT_RECIPES")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at pydantic location ``loc``, or its nearest parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == str(key)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _field_path(loc: tuple) -> str:
    # pydantic adds the type it tried for unions ("int", "literal['none']"): not a field name.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in {"int", "bool", "float", "str"}))]
    return ".".join(parts)


def parse_recipe(text: str, source: str) -> Recipe:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except (RecursionError, ValueError) as exc:  # nesting deep enough to exhaust the parser, a 4300-digit integer
        raise Phi3ExportError(f"{source}: unreadable YAML ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = (getattr(exc, "problem", None) or str(exc)).splitlines()[0]
        raise Phi3ExportError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise Phi3ExportError(f"{source}:1: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        # A typo shows up twice: as an unknown key and as a missing one; name the typo.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        loc = tuple(first["loc"])
        line = _line_of(node, loc)
        field = _field_path(loc) or "(recipe)"
        message = clean_message(first["msg"])
        if first["type"] == "extra_forbidden":
            message = "unknown field (typo?)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise Phi3ExportError(f"{source}:{line}: {field}: {message}{more}") from None


def clean_message(message: str) -> str:
    """pydantic's message without its "Value error, " / "Assertion failed, " prefix."""
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A shipped recipe by name, or a recipe file by path."""
    text_path = Path(name_or_path)
    is_path = text_path.suffix in {".yaml", ".yml"} or os.sep in str(name_or_path)
    if not is_path:
        text_path = recipes_dir() / f"{name_or_path}.yaml"
        if not text_path.is_file():
            close = difflib.get_close_matches(str(name_or_path), list_recipes(), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise Phi3ExportError(
                f"unknown recipe {str(name_or_path)!r}; {hint}`phi3-export recipes list` shows the shipped ones"
            )
    elif not text_path.is_file():
        raise Phi3ExportError(f"{text_path}: recipe file not found")
    try:
        text = text_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Phi3ExportError(f"{text_path}: not UTF-8 text (byte {exc.start})") from None
    recipe = parse_recipe(text, str(text_path))
    return recipe
