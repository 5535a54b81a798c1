"""Core ML export: a stateful int4 ``.mlpackage`` built from the same quantized checkpoint as ONNX."""

from phi3_export.export.coreml.artifact import MLPACKAGE, export_coreml

__all__ = ["MLPACKAGE", "export_coreml"]
