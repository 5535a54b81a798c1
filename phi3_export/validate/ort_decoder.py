"""Run an exported decoder with plain ONNX Runtime: full logits, with or without a KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class OrtDecoder:
    def __init__(self, folder: Path, threads: int = 0, providers: list[str] | None = None):
        folder = Path(folder)
        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=providers or ["CPUExecutionProvider"])
        self.dtype = np.float16 if self.session.get_inputs()[2].type == "tensor(float16)" else np.float32

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {f"past_key_values.{i}.{k}": np.zeros(shape, self.dtype) for i in range(self.layers) for k in ("key", "value")}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        past = next(iter(cache.values())).shape[2]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((ids.shape[0], past + ids.shape[1]), np.int64), **cache}
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(None, feeds)))
        new_cache = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(self.layers) for k in ("key", "value")}
        return outs["logits"].astype(np.float32), new_cache


def perplexity(decoder: OrtDecoder, ids: list[int], window: int = 256, stride: int = 256) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens (stride == window)."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, stride):
        chunk = np.asarray(ids[start : start + window + 1])[None, :]
        if chunk.shape[1] < 2:
            break
        logits, _ = decoder.step(chunk[:, :-1], decoder.empty_cache())
        logits = logits[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = chunk[0, 1:]
        total -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
    return float(np.exp(total / count))
