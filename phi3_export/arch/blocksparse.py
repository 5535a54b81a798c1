"""Phi-3-small's blocksparse attention pattern, as the published model defines it.

Keys and queries are cut into blocks of ``block`` tokens. Query block ``q`` of head ``h``
sees key block ``k`` when ``q >= k`` and either ``q - k < local_blocks`` (the local window)
or ``(k + h * step + 1) % vert_stride == 0`` (a vertical stripe), where
``step = max(1, vert_stride // heads)``: each head has its own stripes unless the pattern is
homogeneous (``homo_head``: every head uses head 0's). Within the visible blocks attention is
causal per token. Some ports hard-code ``step = 1``; with few heads that is a different model.

The reference (arch/phi3small_layer.py), the ONNX exporter (SparseAttention's CSR layout) and
the Core ML program (a per-head additive mask) all read the pattern from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockSparse:
    """The config's blocksparse settings (``blocksparse_*`` keys)."""

    block: int
    local_blocks: int
    vert_stride: int
    homo_head: bool = False

    def head_step(self, heads: int) -> int:
        return max(1, self.vert_stride // heads)

    def block_mask(self, heads: int, n_blocks: int, only: int | None = None) -> np.ndarray:
        """[heads, n_blocks (query), n_blocks (key)] bool: which key blocks each query block sees
        (with ``only``: the first ``only`` heads' patterns of a model of ``heads`` heads)."""
        q = np.arange(n_blocks)[:, None]
        k = np.arange(n_blocks)[None, :]
        causal_local = (q >= k) & (q - k < self.local_blocks)
        step = self.head_step(heads)
        masks = []
        for h in range(heads if only is None else only):
            offset = 0 if self.homo_head else h * step
            stripes = ((np.arange(n_blocks) + offset + 1) % self.vert_stride == 0)[None, :]
            masks.append(causal_local | ((q >= k) & stripes))
        return np.stack(masks)

    def token_mask(self, heads: int, queries: np.ndarray, keys: int) -> np.ndarray:
        """[heads, len(queries), keys] bool for query positions ``queries`` over key positions 0..keys-1."""
        n_blocks = -(-max(int(queries.max()) + 1, keys) // self.block)
        blocks = self.block_mask(heads, n_blocks)
        qb = queries // self.block
        kb = np.arange(keys) // self.block
        visible = blocks[:, qb][:, :, kb]
        return visible & (np.arange(keys)[None, None, :] <= queries[None, :, None])

    def layouts(self, heads: int) -> int:
        """How many distinct head patterns there are (heads h and h + layouts share one)."""
        if self.homo_head:
            return 1
        period = self.vert_stride // np.gcd(self.head_step(heads), self.vert_stride)
        return period if heads % period == 0 else heads

    def csr(self, heads: int, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """(row offsets [layouts, n_blocks + 1], column indices [layouts, max nnz] padded with -1) int32.

        onnxruntime's SparseAttention layout: head h uses layout ``h % layouts``.
        """
        n_layouts = self.layouts(heads)
        mask = self.block_mask(heads, n_blocks, only=n_layouts)  # 32 heads x 2048 blocks would be 134 MB
        rows = np.zeros((n_layouts, n_blocks + 1), np.int32)
        rows[:, 1:] = np.cumsum(mask.sum(axis=2), axis=1)
        width = int(rows[:, -1].max())
        cols = np.full((n_layouts, width), -1, np.int32)
        for layout in range(n_layouts):
            idx = np.nonzero(mask[layout])[1]
            cols[layout, : idx.size] = idx
        return rows, cols
