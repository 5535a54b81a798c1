"""RoPE cos/sin tables from a plan's ``Rotary``, computed the way transformers computes them (float32).

Shared model data: the ONNX graph and the Core ML program embed these tables, and the
torch reference rotates with the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from phi3_export.arch.plan import Rotary


def cos_sin(theta: float, rotary_dim: int, length: int, factors: tuple[float, ...] | None, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """[length, rotary_dim/2] tables; ``factors`` are LongRoPE's per-frequency divisors."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if factors is None:
        inv_freq = 1.0 / (theta**exponent)
    else:
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponent)
    positions = torch.arange(length, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


def rotary_tables(rotary: Rotary, length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"": (cos, sin)}`` for plain RoPE; ``{"short": ..., "long": ...}`` for LongRoPE."""
    if not rotary.longrope:
        return {"": cos_sin(rotary.theta, rotary.dim, length, None, rotary.short_scale)}
    return {
        "short": cos_sin(rotary.theta, rotary.dim, length, rotary.short_factor, rotary.short_scale),
        "long": cos_sin(rotary.theta, rotary.dim, length, rotary.long_factor, rotary.long_scale),
    }


def torch_cos_sin(rotary: Rotary, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, seq_len, dim] cos/sin as transformers' rotary embedding returns them (halves repeated)."""
    tables = rotary_tables(rotary, seq_len)
    cos, sin = tables["long" if rotary.longrope and seq_len > rotary.original_context else ("short" if rotary.longrope else "")]
    cos, sin = torch.from_numpy(cos), torch.from_numpy(sin)
    return torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
