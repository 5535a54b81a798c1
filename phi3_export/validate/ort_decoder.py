"""Run an exported decoder with plain ONNX Runtime: full logits, with or without a KV cache.

Most graphs take a past KV cache of the tokens so far and return a new, longer one. A graph
with SparseAttention (Phi-3-small) runs only with past and present in one buffer: its CPU
kernel checks that they are the same memory, as onnxruntime-genai's
``past_present_share_buffer`` arranges. For those the cache is a preallocated buffer bound as
both input and output (IOBinding), with ``length`` of its rows filled; it grows on demand (up to
the artifact's max_length), so a short check does not allocate a max_length cache. GroupQueryAttention
layers in the same graph read the same shared layout.

An image + text artifact's decoder (genai_config with an ``embedding`` section, Phi-3-vision)
takes ``inputs_embeds``: token ids go through its embedding.onnx first, with no image
features (``[0, hidden]``, what onnxruntime-genai sends on text-only and decode steps), so
text-only accuracy runs the same two models the runtime does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from phi3_export.paths import inside

# Ops whose CPU kernels need past and present KV in one buffer.
SHARED_BUFFER_OPS = {"SparseAttention"}
FIRST_CAPACITY = 256  # rows of a fresh shared buffer; doubled as the sequence grows


class SharedCache(dict):
    """past_key_values.* buffers [batch, kv_heads, capacity, head_dim]; rows [0, length) hold the tokens so far.

    A step writes into these buffers in place: a cache handed to ``step`` is consumed (use
    the one it returns).
    """

    def __init__(self, arrays: dict[str, np.ndarray], length: int):
        super().__init__(arrays)
        self.length = length

    @property
    def capacity(self) -> int:
        return next(iter(self.values())).shape[2]


class OrtDecoder:
    def __init__(self, folder: Path, threads: int = 0, providers: list[str] | None = None):
        folder = Path(folder)
        genai = json.loads((folder / "genai_config.json").read_text())
        cfg = genai["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
        self.max_length = int(genai["search"]["max_length"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(inside(folder, cfg.get("filename", "model.onnx"), "genai_config.json: model.decoder.filename")), opts, providers=providers)
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        embedding = genai["model"].get("embedding")
        self.embedding = None
        if embedding:  # the decoder reads inputs_embeds (module docstring)
            self.embedding = ort.InferenceSession(str(inside(folder, embedding["filename"], "genai_config.json: model.embedding.filename")), opts, providers=providers)
            features = next(i for i in self.embedding.get_inputs() if i.name == embedding["inputs"]["image_features"])
            self._no_features = np.zeros((0, cfg["hidden_size"]),
                                         np.float16 if features.type == "tensor(float16)" else np.float32)
            self._embedding_io = embedding
        graph = onnx.load(str(inside(folder, cfg.get("filename", "model.onnx"), "genai_config.json: model.decoder.filename")), load_external_data=False).graph  # node list only: weights stay on disk
        self.shared_buffer = any(node.op_type in SHARED_BUFFER_OPS for node in graph.node)

    def _names(self) -> list[str]:
        return [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def _buffers(self, batch: int, capacity: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        return {name: np.zeros(shape, self.dtype) for name in self._names()}

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        if self.shared_buffer:
            return SharedCache(self._buffers(batch, min(FIRST_CAPACITY, self.max_length)), 0)
        return self._buffers(batch, 0)

    def token_inputs(self, ids: np.ndarray, image_features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The decoder's token input: ``input_ids``, or ``inputs_embeds`` through embedding.onnx."""
        if self.embedding is None:
            return {"input_ids": np.ascontiguousarray(ids, np.int64)}
        io = self._embedding_io
        ids_type = next(i.type for i in self.embedding.get_inputs() if i.name == io["inputs"]["input_ids"])
        feeds = {io["inputs"]["input_ids"]: np.ascontiguousarray(ids, np.int32 if ids_type == "tensor(int32)" else np.int64),
                 io["inputs"]["image_features"]: self._no_features if image_features is None
                 else np.ascontiguousarray(image_features, self._no_features.dtype)}
        return {"inputs_embeds": self.embedding.run([io["outputs"]["inputs_embeds"]], feeds)[0]}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if isinstance(cache, SharedCache):
            return self._shared_step(ids, cache)
        past = next(iter(cache.values())).shape[2]
        feeds = {**self.token_inputs(ids), "attention_mask": np.ones((ids.shape[0], past + ids.shape[1]), np.int64), **cache}
        names = [o.name for o in self.session.get_outputs()]
        outs = dict(zip(names, self.session.run(None, feeds)))
        new_cache = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(self.layers) for k in ("key", "value")}
        return outs["logits"].astype(np.float32), new_cache

    def _shared_step(self, ids: np.ndarray, cache: SharedCache) -> tuple[np.ndarray, SharedCache]:
        total = cache.length + ids.shape[1]
        if total > self.max_length:
            raise ValueError(f"{total} tokens exceed the artifact's max_length {self.max_length}")
        if total > cache.capacity:  # grow: copy the filled rows into a larger buffer
            grown = self._buffers(ids.shape[0], min(self.max_length, max(total, 2 * cache.capacity)))
            for name, old in cache.items():
                grown[name][:, :, : cache.length] = old[:, :, : cache.length]
            cache = SharedCache(grown, cache.length)
        binding = self.session.io_binding()
        tokens = self.token_inputs(ids)  # kept alive until the run ends, like the cache values below
        for name, value in tokens.items():
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("attention_mask", np.ones((ids.shape[0], total), np.int64))
        binding.bind_output("logits")
        values = []  # kept alive until the run ends: they wrap the numpy buffers without copying
        for name, buffer in cache.items():
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            values.append(value)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits.astype(np.float32), SharedCache(dict(cache), total)


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
