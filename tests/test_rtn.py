import pytest
import torch

from phi3_export.quant.qcheckpoint import pack_codes, unpack_codes
from phi3_export.quant.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_within_half_a_step(bits, block, symmetric):
    w = torch.randn(24, 300, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(w, bits, block, symmetric)
    levels = 2**bits - 1
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= levels
    assert q.scales.shape == q.zeros.shape == (24, -(-300 // block))
    if symmetric:
        assert torch.all(q.zeros == 2 ** (bits - 1))
    err = (q.dequantize() - w).abs()
    step = q.scales.abs().repeat_interleave(block, dim=1)[:, :300]
    # Asymmetric: half a step. Symmetric maps the signed extreme onto -2**(bits-1), so the
    # opposite extreme may clip by up to one step (the price of using all 2**bits levels).
    assert torch.all(err <= (step if symmetric else step / 2) + 1e-6)


def test_symmetric_uses_the_extreme_level():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0] * 4])
    q = quantize_rtn(w, 4, 16, True)
    assert int(q.codes.min()) == 0  # -1.0 maps to code 0 = -8 steps
    assert torch.allclose(q.dequantize(), torch.round(w / (1 / 8)) * (1 / 8))


def test_constant_block_is_exact():
    w = torch.zeros(2, 32)
    for symmetric in (True, False):
        assert torch.equal(quantize_rtn(w, 4, 32, symmetric).dequantize(), w)


def test_pack_roundtrip_low_nibble_first():
    codes = torch.randint(0, 16, (5, 33), dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (5, 17)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_codes(packed, 4, 33), codes)
