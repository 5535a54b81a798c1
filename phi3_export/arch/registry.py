"""One registry of architectures, keyed by the HF ``architectures`` name."""

from __future__ import annotations

from phi3_export.arch.base import Architecture
from phi3_export.errors import NotSupportedYet, Phi3ExportError

_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    for name in cls.names:
        if name in _REGISTRY:
            raise RuntimeError(f"architecture {name} registered twice")
        _REGISTRY[name] = cls
    return cls


def known_architectures() -> dict[str, type[Architecture]]:
    return dict(_REGISTRY)


def architecture(name: str, *, source: str = "") -> type[Architecture]:
    """The module for ``name``; unknown or not-yet-supported names give a clear error."""
    prefix = f"{source}: " if source else ""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise Phi3ExportError(
            f"{prefix}unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None
    if not cls.supported:
        raise NotSupportedYet(f"{prefix}not supported yet: {name} ({cls.why_unsupported})")
    return cls
