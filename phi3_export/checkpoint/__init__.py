"""Checkpoint loading: lazy safetensors reader, config normalisation, recipe checks."""

from phi3_export.checkpoint.reader import Checkpoint

__all__ = ["Checkpoint"]
