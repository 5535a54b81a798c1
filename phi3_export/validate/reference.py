"""The unquantized checkpoint run in torch, one decoder layer at a time.

Validation compares an artifact with the model it came from. Loading that model whole
(15 GB in fp32 for Phi-3-mini) would break the memory budget every other stage keeps, so
the reference streams like AWQ calibration does: all sequences go through layer 0, then
layer 1, ..., carrying only the hidden states (a few MB for a few thousand tokens). The
LM head is applied in row blocks. The decoder layer module is the architecture's own
(transformers' Phi3DecoderLayer), fp32, with an explicit causal (and sliding-window) mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from phi3_export.arch import architecture
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.memory import release_freed_memory

LM_HEAD_ROWS = 8192  # LM-head rows multiplied at once: 8192 x 3072 fp32 = 100 MB


class StreamedReference:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.arch = architecture(ckpt.config.get("architectures", ["?"])[0])
        self.facts = self.arch.facts_from_config(ckpt.config, ckpt.tokenizer_kind)

    def hidden_states(self, sequences: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """Final-norm hidden states [n, seq, hidden] of equal-length ``sequences`` [n, seq]."""
        arch, ckpt, config = self.arch, self.ckpt, self.ckpt.config
        extra = arch.calibration_inputs(config, sequences.shape[1])
        x = ckpt.gather_rows(arch.embed, sequences)
        with torch.no_grad():
            for i in range(self.facts.num_layers):
                roles = (*arch.layer_norms, *arch.layer_linears)
                layer = arch.loaded_layer(config, i, {role: ckpt.tensor(arch.layer_tensor(role, i)) for role in roles})
                x = torch.cat([layer(x[k : k + batch], **extra) for k in range(0, x.shape[0], batch)])
                del layer
                ckpt.close()  # unmap the shards read so far
                release_freed_memory()
            norm = ckpt.tensor(arch.final_norm)
            eps = config.get("rms_norm_eps", 1e-5)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm
        return x

    def logits(self, hidden: torch.Tensor) -> Iterator[np.ndarray]:
        """fp32 logits [seq, vocab] for each sequence of final hidden states, LM head in row blocks."""
        name = self.arch.embed if self.facts.tie_word_embeddings is True else self.arch.lm_head
        vocab = self.ckpt.shape(name)[0]
        with torch.no_grad():
            for h in hidden:
                out = np.empty((h.shape[0], vocab), np.float32)
                for start in range(0, vocab, LM_HEAD_ROWS):
                    block = self.ckpt.rows(name, start, min(vocab, start + LM_HEAD_ROWS))
                    out[:, start : start + block.shape[0]] = (h @ block.T).numpy()
                yield out
