"""What a quantizer may need beyond the settings: calibration text and options, resume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantizeRequest:
    calibration_text: str = ""
    awq: object = None  # quant.awq_search.AwqOptions
    resume: bool = False
