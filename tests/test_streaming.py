"""Export memory is flat in model depth: the exporter holds one tensor at a time."""

import sys

import torch

from phi3_export.fixtures.tiny import make_fixture
from phi3_export.memory import run_measured
from phi3_export.recipes import load_recipe


def test_peak_anonymous_memory_flat_in_layer_count(tmp_path):
    recipe = load_recipe("phi-3-mini-4k")
    peaks = {}
    for layers in (4, 24):
        checkpoint = tmp_path / f"ckpt{layers}"
        make_fixture(recipe, checkpoint, layers=layers, hidden=1024, dtype=torch.bfloat16)
        result = run_measured([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(checkpoint),
                               "--out", str(tmp_path / f"out{layers}"), "--bits", "4", "--target", "cpu", "--quiet"])
        assert result.returncode == 0, result.stderr
        peaks[layers] = result.peak_rss_anon_mb
    # 24 layers of width 1024 are ~6x the weights of 4; memory must not follow.
    assert peaks[24] <= 1.3 * peaks[4], peaks
