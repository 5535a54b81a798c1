"""Export memory is flat in model depth: the exporter holds one tensor at a time."""


def test_peak_anonymous_memory_flat_in_layer_count(peaks_by_depth, tmp_path):
    peaks = peaks_by_depth(tmp_path, "--bits", "4", "--target", "cpu")
    shallow, deep = sorted(peaks)  # the depths of conftest.WIDE
    # 8x the weights (see conftest.WIDE); memory must not follow.
    assert peaks[deep] <= 1.3 * peaks[shallow], peaks
