"""Packaging stage: drop-in app bundles (`phi3-export package`) and their check (`phi3-export verify`)."""

from phi3_export.package.bundle import package
from phi3_export.package.verify import verify_bundle

__all__ = ["package", "verify_bundle"]
