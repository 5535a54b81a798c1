"""Versions of the tool and the libraries that shape an artifact (recorded in manifests)."""

from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxruntime-genai", "coremltools", "transformers", "safetensors", "numpy")


def tool_version() -> str:
    try:
        return version("phi3-export")
    except PackageNotFoundError:
        return "0+unknown"


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
