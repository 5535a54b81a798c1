"""Shared test checkpoints: built once per session from the shipped recipes (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
    """``fixture_dir(recipe, **kwargs)`` -> path of a tiny checkpoint, cached per arguments."""
    from phi3_export.fixtures.tiny import make_fixture
    from phi3_export.recipes import load_recipe

    cache: dict[tuple, Path] = {}

    def build(recipe: str, **kwargs) -> Path:
        key = (recipe, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"fx-{recipe}")
            make_fixture(load_recipe(recipe), out, **kwargs)
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def exported(tmp_path_factory, fixture_dir):
    """``exported(recipe, fixture_kwargs=None, **quantize_kwargs)`` -> OUT folder, cached."""
    from phi3_export.api import quantize

    cache: dict[tuple, Path] = {}

    def build(recipe: str, fixture_kwargs: dict | None = None, **kwargs) -> Path:
        key = (recipe, tuple(sorted((fixture_kwargs or {}).items())), tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"out-{recipe}") / "out"
            quantize(fixture_dir(recipe, **(fixture_kwargs or {})), out, **kwargs)
            cache[key] = out
        return cache[key]

    return build
