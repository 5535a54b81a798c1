"""RoPE cos/sin tables, computed the way transformers computes them (float32)."""

from __future__ import annotations

import numpy as np
import torch


def cos_sin(theta: float, rotary_dim: int, length: int, factors: list[float] | None, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """[length, rotary_dim/2] tables; ``factors`` are LongRoPE's per-frequency divisors."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if factors is None:
        inv_freq = 1.0 / (theta**exponent)
    else:
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponent)
    positions = torch.arange(length, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()
