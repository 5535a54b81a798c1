"""Runs a Core AI asset on Apple's own runtime (coreai-core's CPU runtime, which runs on Linux too).

``CoreAIDecoder(folder)(ids)`` feeds a token list through the asset the way an app would:
whole prefill chunks (the last one padded at the end) while a chunk fits the context, then
single tokens through ``decode``, one KV-cache state shared by both functions. It returns the
logits of every fed token and keeps the cache, so calls continue the sequence.

On Linux the runtime is a reference interpreter (seconds per decode step at Phi-3 width):
it tells accuracy, not speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import numpy as np

from phi3_export.export.coreai.contract import (
    AIMODEL,
    CONFIG,
    DECODE,
    INPUT_IDS,
    LOGITS,
    POSITION,
    PREFILL,
)


@contextlib.contextmanager
def _native_stderr_silenced():
    """The runtime's native code logs "Loading function ..." to file descriptor 2; failures still raise."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CoreAIDecoder:
    def __init__(self, folder: Path):
        from phi3_export.export.coreai.lib import coreai_torch

        coreai_torch()  # the pinned versions, or a one-line error
        from coreai.authoring.asset import AIModelAsset
        from coreai.runtime import NDArray

        self.folder = Path(folder)
        self.config = json.loads((self.folder / CONFIG).read_text())
        self.chunk = self.config["functions"][PREFILL]["inputs"][INPUT_IDS]["shape"][1]
        self.context = self.config["context_length"]
        dtype = np.float16 if self.config["precision"] == "float16" else np.float32
        self._ndarray = NDArray
        self._dtype = dtype
        self.reset()
        self._loop = asyncio.new_event_loop()
        self._stack = contextlib.AsyncExitStack()
        model = self._loop.run_until_complete(self._stack.enter_async_context(AIModelAsset.load(self.folder / AIMODEL).executable()))
        with _native_stderr_silenced():
            self.functions = {name: model.load_function(name) for name in (PREFILL, DECODE)}

    def reset(self) -> None:
        """An empty cache: the next call starts a new sequence. (New arrays: NDArray.numpy() may be a copy,
        so zeroing it in place would leave the runtime's cache untouched.)"""
        self.state = {name: self._ndarray(np.zeros(spec["shape"], self._dtype)) for name, spec in self.config["states"].items()}
        self.length = 0

    def _run(self, name: str, ids: list[int]) -> np.ndarray:
        inputs = {INPUT_IDS: self._ndarray(np.array([ids], np.int32)), POSITION: self._ndarray(np.array([self.length], np.int32))}
        out = self._loop.run_until_complete(self.functions[name](inputs=inputs, state=self.state))
        return np.array(out[LOGITS].numpy()[0], dtype=np.float32)

    def __call__(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.context:
            raise ValueError(f"{self.length} + {len(ids)} tokens exceed the asset's context length {self.context}")
        rows = []
        start = 0
        # Prefill while a whole chunk still fits in the cache (its padding is written there too).
        while len(ids) - start > 1 and self.length + self.chunk <= self.context:
            part = ids[start : start + self.chunk]
            logits = self._run(PREFILL, part + [0] * (self.chunk - len(part)))
            rows.append(logits[: len(part)])
            self.length += len(part)
            start += len(part)
        for token in ids[start:]:
            rows.append(self._run(DECODE, [token]))
            self.length += 1
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        self._loop.run_until_complete(self._stack.aclose())
        self._loop.close()


def describe_in_subprocess(folder: Path) -> dict:
    """Load the asset in a child process and return its functions' IO: coreai-core's native loader
    can crash the process on a damaged asset, and ``verify`` must report that, not die of it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "phi3_export.validate.coreai_runtime", str(folder)],
                          check=False, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"the process ended with status {proc.returncode}"
        raise RuntimeError(why if proc.returncode > 0 else f"the runtime crashed (signal {-proc.returncode})")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    import sys

    decoder = CoreAIDecoder(Path(sys.argv[1]))
    try:
        print(json.dumps({name: {"inputs": list(f.desc.input_names), "outputs": list(f.desc.output_names),
                                 "states": sorted(f.desc.state_names)} for name, f in decoder.functions.items()}))
    finally:
        decoder.close()
