"""Architecture registry: importing this package registers every architecture module."""

from phi3_export.arch import phi3, phi3small, phi3v, phimoe  # noqa: F401  (registration side effect)
from phi3_export.arch.base import Architecture
from phi3_export.arch.registry import architecture, known_architectures, register

__all__ = ["Architecture", "architecture", "known_architectures", "register"]
