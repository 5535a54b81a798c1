"""fp32 ONNX logits match transformers', in prefill and in cached decode steps."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from phi3_export.validate.ort_decoder import OrtDecoder

TOL = 1e-4


def _compare(fixture: str, artifact: str, length: int, decode_steps: int = 3):
    model = AutoModelForCausalLM.from_pretrained(fixture).eval()
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (1, length))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    decoder = OrtDecoder(artifact)
    prefill = length - decode_steps
    logits, cache = decoder.step(ids[:, :prefill], decoder.empty_cache())
    worst = np.abs(logits - ref[:, :prefill]).max()
    for t in range(prefill, length):
        logits, cache = decoder.step(ids[:, t : t + 1], cache)
        worst = max(worst, np.abs(logits[:, 0] - ref[:, t]).max())
    return worst


@pytest.mark.parametrize("recipe", ["phi-3-mini-4k", "phi-3-medium-4k", "phi-4-mini"])
def test_fp32_matches_transformers(recipe, fixture_dir, exported):
    out = exported(recipe, bits=32, targets=("cpu",))
    assert _compare(fixture_dir(recipe), out / "onnx-cpu", length=48) <= TOL


def test_long_factors_past_original_context(fixture_dir, exported):
    # 4300 tokens > 4096: transformers switches every position to LongRoPE's long factors.
    out = exported("phi-3-mini-128k", bits=32, targets=("cpu",), max_length=8192)
    assert _compare(fixture_dir("phi-3-mini-128k"), out / "onnx-cpu", length=4300) <= TOL


def test_sliding_window_past_2047(fixture_dir, exported):
    # Phi-3-mini-4k attends over a 2047-token window; past it the ONNX graph must window too.
    out = exported("phi-3-mini-4k", bits=32, targets=("cpu",))
    assert _compare(fixture_dir("phi-3-mini-4k"), out / "onnx-cpu", length=2100) <= TOL


def test_fp16_dml_graph_close_to_transformers(fixture_dir, exported):
    out = exported("phi-3-mini-4k", bits=16, targets=("dml",))
    assert _compare(fixture_dir("phi-3-mini-4k"), out / "onnx-dml", length=24) <= 2e-2
