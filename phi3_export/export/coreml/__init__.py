"""Core ML export: a stateful int4 ``.mlpackage`` built from the same quantized checkpoint as ONNX."""

from phi3_export.export.coreml.artifact import export_coreml
from phi3_export.export.coreml.contract import MLPACKAGE

__all__ = ["MLPACKAGE", "export_coreml"]
