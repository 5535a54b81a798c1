"""The unquantized checkpoint run in torch, one decoder layer at a time.

Validation compares an artifact with the model it came from. Loading that model whole
(15 GB in fp32 for Phi-3-mini) would break the memory budget every other stage keeps, so
the reference streams like AWQ calibration does (checkpoint/stream.py): all sequences go
through layer 0, then layer 1, ..., carrying only the hidden states (a few MB for a few
thousand tokens). The LM head is applied in row blocks. Each layer is the architecture's
own torch layer module, fp32, with an explicit causal (and sliding-window) mask; the final
norm is the plan's (RMSNorm, or LayerNorm with bias), and the LM head's bias is added. The
plan's decoder-level scales (muP: embedding_scale, logits_scale) and masked ids apply when it
has them (Phi-3-small); for the others they are 1.0 and empty.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from phi3_export.arch.plan import Norm
from phi3_export.checkpoint.check import checked_architecture
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.checkpoint.stream import embedded, load_tensors, stream_layers

LM_HEAD_ROWS = 8192  # LM-head rows multiplied at once: 8192 x 3072 fp32 = 100 MB


def torch_norm(norm: Norm, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A plan norm in fp32 torch: the reference's final norm."""
    weight = tensors[norm.weight]
    if norm.kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * weight
    bias = tensors[norm.bias] if norm.bias else None
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, norm.eps)


class StreamedReference:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.arch = checked_architecture(ckpt)  # config.json range-checked before facts and plan are built
        self.facts = self.arch.facts_from_config(ckpt.config, ckpt.tokenizer_kind)
        self.plan = self.arch.plan(ckpt.config)

    def hidden_states(self, sequences: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """Final-norm hidden states [n, seq, hidden] of equal-length ``sequences`` [n, seq]."""
        return self.hidden_states_of(embedded(self.ckpt, self.plan.decoder, sequences), batch)

    def hidden_states_of(self, x: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """Final-norm hidden states of layer 0's input ``x`` [n, seq, hidden] (token rows from
        ``embedded``, or an image model's inputs_embeds), streamed one layer at a time."""
        arch, ckpt, config, decoder = self.arch, self.ckpt, self.ckpt.config, self.plan.decoder
        extra = arch.calibration_inputs(config, x.shape[1])
        with torch.no_grad():
            for layer in stream_layers(ckpt, decoder.layers):
                module = arch.loaded_layer(config, layer, load_tensors(ckpt, layer.tensors()))
                x = torch.cat([module(x[k : k + batch], **extra) for k in range(0, x.shape[0], batch)])
                del module
            x = torch_norm(decoder.final_norm, x, load_tensors(ckpt, decoder.final_norm.tensors()))
        return x

    def logits(self, hidden: torch.Tensor) -> Iterator[np.ndarray]:
        """fp32 logits [seq, vocab] for each sequence of final hidden states, LM head in row blocks,
        times the plan's logits scale, its masked ids at float32's lowest value."""
        decoder = self.plan.decoder
        head = decoder.lm_head
        vocab = self.ckpt.shape(head.weight)[0]
        bias = self.ckpt.tensor(head.bias) if head.bias else None
        with torch.no_grad():
            for h in hidden:
                out = np.empty((h.shape[0], vocab), np.float32)
                for start in range(0, vocab, LM_HEAD_ROWS):
                    block = self.ckpt.rows(head.weight, start, min(vocab, start + LM_HEAD_ROWS))
                    part = h @ block.T
                    if bias is not None:
                        part = part + bias[start : start + block.shape[0]]
                    out[:, start : start + block.shape[0]] = part.numpy()
                if decoder.logits_scale != 1.0:
                    out *= np.float32(decoder.logits_scale)
                if decoder.masked_ids:
                    out[:, list(decoder.masked_ids)] = np.finfo(np.float32).min
                yield out
