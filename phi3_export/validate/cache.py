"""Reference logits cached on disk, keyed by (checkpoint hash, eval text hash, windows).

The reference is the slow half of validation (the unquantized model in fp32 torch); its
logits do not change between validations of different artifacts or settings, so they are
stored once as one float32 .npy per window and memory-mapped when read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

CACHE_VERSION = 1  # bump when the reference computation changes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "phi3-export" / "reference"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(folder: Path, cache_dir: Path) -> str:
    """sha256 over config.json and every safetensors file, memoised by (path, size, mtime)."""
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
    stamp = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    memo = cache_dir / "checkpoint-hashes" / (hashlib.sha256(stamp.encode()).hexdigest() + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode())
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


class LogitsCache:
    def __init__(self, cache_dir: Path, checkpoint_sha: str, text_sha: str, window: int, stride: int):
        key = hashlib.sha256(json.dumps([CACHE_VERSION, checkpoint_sha, text_sha, window, stride]).encode()).hexdigest()
        self.folder = Path(cache_dir) / key[:32]

    def complete(self, count: int) -> bool:
        return (self.folder / "done.json").is_file() and all(self._path(k).is_file() for k in range(count))

    def _path(self, k: int) -> Path:
        return self.folder / f"window-{k:04d}.npy"

    def write(self, k: int, logits: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".window-{k:04d}.tmp.npy"
        np.save(tmp, logits.astype(np.float32))
        tmp.replace(self._path(k))

    def finish(self, count: int) -> None:
        (self.folder / "done.json").write_text(json.dumps({"windows": count}))

    def read(self, k: int) -> np.ndarray:
        return np.load(self._path(k), mmap_mode="r")
