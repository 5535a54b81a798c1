"""Imports Apple's Core AI Python packages (the optional ``[coreai]`` extra), pinned and quiet.

``coreai-torch`` converts a torch module; ``coreai-core`` (import name ``coreai``) holds the
asset writer and, on Linux too, a CPU runtime. The exporter uses one private piece of
coreai-torch, its sub-byte tensor and weight-dequantization module (see weights.py), so the
versions are pinned exactly and checked here: another version is refused, not guessed at.
"""

from __future__ import annotations

import warnings

from phi3_export.errors import Phi3ExportError

PINNED = {"coreai-torch": "0.4.3", "coreai-core": "1.0.0b3"}
INSTALL = "pip install 'phi3-export[coreai]'"


def check_installed() -> None:
    """The pinned packages are installed, or a one-line error saying how to install them."""
    from importlib import metadata

    for dist, version in PINNED.items():
        try:
            found = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise Phi3ExportError(f"--format coreai needs Apple's Core AI packages ({dist} is not installed): {INSTALL}") from None
        if found != version:
            raise Phi3ExportError(f"--format coreai needs {dist}=={version} (found {found}): {INSTALL}")


def coreai_torch():
    """The ``coreai_torch`` module (after ``check_installed``)."""
    check_installed()
    with warnings.catch_warnings():
        # It warns that "2.13.0+cpu" is newer than the 2.13.0 it was validated with (a local version tag).
        warnings.filterwarnings("ignore", message="coreai-torch has only been validated")
        import coreai_torch
    return coreai_torch
