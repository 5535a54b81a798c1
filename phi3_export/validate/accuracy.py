"""Accuracy of an artifact against the reference on the same token ids.

Perplexity alone hides damage that shifts probability among likely tokens, so beside it
we report what llama.cpp's `--kl-divergence` does: the KL divergence of the artifact's
next-token distribution from the reference's (mean and 99th percentile over scored
positions) and the rate at which both put the same token on top.

Windows: sequence k is ids[k*stride : k*stride + window + 1], plus one last window flush
with the end of the text (one shorter window when the whole text is shorter). The first
window scores all of its ``window`` predictions; later ones only those not scored before
(the last ``stride``), so every token after the first is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def windows(n_ids: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored prediction) per window."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    if n_ids < 2:
        raise ValueError("the eval text must be at least 2 tokens")
    if n_ids < window + 1:
        return [(0, 0)]
    count = (n_ids - window - 1) // stride + 1
    out = [(k * stride, 0 if k == 0 else window - stride) for k in range(count)]
    left = n_ids - (out[-1][0] + window + 1)
    if left:  # one last window, flush with the end, scoring only the tokens not yet scored
        out.append((n_ids - window - 1, window - left))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Comparison:
    """Running sums over scored positions; ``summary()`` gives the record's figures."""

    nll_reference: float = 0.0
    nll_artifact: float = 0.0
    kld: list[np.ndarray] = field(default_factory=list)
    same_top: int = 0
    count: int = 0

    def add(self, reference_logits: np.ndarray, artifact_logits: np.ndarray, targets: np.ndarray, chunk: int = 128) -> None:
        """Logits [positions, vocab] predicting ``targets`` [positions]."""
        if reference_logits.shape != artifact_logits.shape:
            raise ValueError(f"logit shapes differ: reference {reference_logits.shape}, artifact {artifact_logits.shape}")
        for s in range(0, len(targets), chunk):  # float64 in chunks: exact enough for KLD ~1e-12, bounded memory
            p, q, t = log_softmax(reference_logits[s : s + chunk]), log_softmax(artifact_logits[s : s + chunk]), targets[s : s + chunk]
            rows = np.arange(len(t))
            self.nll_reference -= p[rows, t].sum()
            self.nll_artifact -= q[rows, t].sum()
            self.kld.append(np.maximum((np.exp(p) * (p - q)).sum(axis=-1), 0.0))
            self.same_top += int((p.argmax(-1) == q.argmax(-1)).sum())
            self.count += len(t)

    def summary(self) -> dict:
        kld = np.concatenate(self.kld) if self.kld else np.zeros(0)
        n = max(self.count, 1)
        ppl_ref, ppl_art = float(np.exp(self.nll_reference / n)), float(np.exp(self.nll_artifact / n))
        return {
            "positions": self.count,
            "perplexity_reference": ppl_ref,
            "perplexity_artifact": ppl_art,
            "perplexity_change_pct": 100.0 * (ppl_art / ppl_ref - 1.0),
            "kld_mean": float(kld.mean()) if kld.size else None,
            "kld_p99": float(np.percentile(kld, 99)) if kld.size else None,
            "kld_max": float(kld.max()) if kld.size else None,
            "top1_agreement": self.same_top / n,
        }


def compare_windows(ids: list[int], reference_logits: Iterable[np.ndarray], artifact_logits: Iterable[np.ndarray],
                    window: int, stride: int) -> dict:
    """Both logit streams give [len(sequence) - 1, vocab] per window, in ``windows()`` order."""
    result = Comparison()
    arr = np.asarray(ids)
    for (start, first), ref, art in zip(windows(len(ids), window, stride), reference_logits, artifact_logits, strict=True):
        sequence = arr[start : start + window + 1]
        result.add(ref[first : len(sequence) - 1], art[first : len(sequence) - 1], sequence[first + 1 :])
    return result.summary()


def first_divergence(generated: list[int], reference_next: np.ndarray) -> int | None:
    """Index of the first generated token the reference would not have chosen greedily.

    ``reference_next[i]`` is the reference's argmax after prompt + generated[:i]: up to the
    first disagreement both runs saw the same prefix, so this equals where two greedy
    generations part ways, from one reference pass instead of a token-by-token loop.
    """
    for i, token in enumerate(generated):
        if int(reference_next[i]) != int(token):
            return i
    return None
