"""Inputs of the reliability suite, built once per run (tests/conftest.py's shared cache) and copied per case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_harness import Workspace

RECIPE = "phi-3-mini-4k"
# Big enough that an export takes a few seconds (a signal lands mid-write, three runs overlap).
BIG = {"layers": 8, "hidden": 512}


@pytest.fixture(scope="session")
def reliability_sources(fixture_dir, exported, shared_cache):
    """``sources(name)``: ckpt (tiny checkpoint), src (its quantize OUT: onnx cpu + mobile), bundle (android),
    records (a folder with r.json, src's validate result)."""
    built: dict[str, Path] = {}

    def bundle() -> Path:
        from phi3_export.package import package

        src = get("src")
        key = json.dumps(["reliability-bundle", str(src)])
        return shared_cache(key, lambda out: package(src, "android", out / "bundle")) / "bundle"

    def records() -> Path:
        """A real `validate --json` result of src (accuracy only): what `report` reads."""
        from reliability_harness import run_cli

        ckpt, src = get("ckpt"), get("src")

        def build(folder: Path) -> None:
            run = run_cli(("validate", src, "--reference", ckpt, "--no-speed", "--quiet", "--window", "64", "--json",
                           folder / "r.json", "--cache-dir", folder.parent / "validate-cache"), cwd=folder)
            assert run.returncode in (0, 1) and (folder / "r.json").is_file(), run.describe()  # 1: a check failed

        return shared_cache(json.dumps(["reliability-records", str(src)]), build)

    makers = {
        "ckpt": lambda: fixture_dir(RECIPE),
        "src": lambda: exported(RECIPE, targets=("cpu", "mobile")),
        "bundle": bundle,
        "records": records,
    }

    def get(name: str) -> Path:
        if name not in built:
            built[name] = makers[name]()
        return built[name]

    return get


@pytest.fixture
def workspace(tmp_path, reliability_sources) -> Workspace:
    return Workspace(tmp_path / "ws", reliability_sources)


@pytest.fixture(scope="session")
def big_checkpoint(fixture_dir) -> Path:
    return fixture_dir(RECIPE, **BIG)


@pytest.fixture(scope="session")
def big_reference_export(exported) -> Path:
    """The uninterrupted export of the big checkpoint (what `quantize --target cpu` gives)."""
    return exported(RECIPE, fixture_kwargs=BIG, targets=("cpu",))
