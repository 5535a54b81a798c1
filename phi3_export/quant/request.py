"""What a quantizer may need beyond the settings: calibration text and options, resume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantizeRequest:
    calibration_text: str = ""
    awq: object = None  # quant.awq_search.AwqOptions (its samples/seqlen/seed calibrate every calibrated method)
    gptq: object = None  # quant.gptq.GptqOptions
    resume: bool = False
