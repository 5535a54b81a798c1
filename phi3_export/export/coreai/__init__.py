"""Core AI export (iOS/macOS 27): ``model.aimodel`` with prefill and decode functions sharing
state and weights, from the same quantized checkpoint as ONNX and Core ML. Needs the
optional ``[coreai]`` extra; nothing here imports it until an export runs."""

from phi3_export.export.coreai.artifact import CoreAIOptions, export_coreai, options
from phi3_export.export.coreai.contract import AIMODEL, MINIMUM_OS

__all__ = ["AIMODEL", "MINIMUM_OS", "CoreAIOptions", "export_coreai", "options"]
