"""The layer-streaming loop every stage shares: one decoder layer's tensors at a time.

RTN, AWQ and validate's reference (and the exporters, over the quantized checkpoint) walk
the plan's layers the same way: read a layer's tensors from the memory-mapped shards, do
the work, then unmap the shards and hand freed memory back before the next layer, so
neither mapped pages nor the allocator's free lists grow with depth.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from phi3_export.arch.plan import Decoder, DecoderLayer
from phi3_export.memory import release_freed_memory


class Closable(Protocol):
    def close(self) -> None: ...


def stream_layers(source: Closable, layers: Iterable[DecoderLayer], task=None) -> Iterator[DecoderLayer]:
    """Yield each layer; after the caller's work on it, unmap ``source`` and release memory."""
    for layer in layers:
        yield layer
        source.close()
        release_freed_memory()
        if task is not None:
            task.advance(f"layer {layer.index}")


def load_tensors(ckpt, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors as float32 copies (safe to edit: the shards stay untouched)."""
    return {name: ckpt.tensor(name) for name in names}


def embedded(ckpt, decoder: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """Layer 0's input for ``tokens`` [n, seq]: the embedding table's rows (only those, never the
    whole table) times the plan's embedding scale (muP). AWQ's calibration and validate's
    reference both start here, so neither can see other activations than the exporters' graphs."""
    x = ckpt.gather_rows(decoder.embedding, tokens)
    return x * decoder.embedding_scale if decoder.embedding_scale != 1.0 else x
