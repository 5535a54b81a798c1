"""The conversion proper: model plan -> torch module -> coreai-torch -> model.aimodel, in its own process.

Why a process of its own: determinism. coreai-core names each weight blob (``resource_N``)
and orders them by hashes LLVM seeds with an address inside its own library, which address
space layout randomisation moves on every run; measured here, two exports of the same
model differed in 500 bytes of names and order. With randomisation turned off for this one
process (it re-executes itself with Linux ``personality(ADDR_NO_RANDOMIZE)``, as ``setarch -R`` does) the names
depend on the content only: byte-identical assets across runs, output paths and whatever
ran before in the parent. The composite graphs' random suffixes (``sdpa_xxxxxxxx``, from
``secrets.choice``) come from a seeded generator instead. A process also hands all of
coreai-core's memory back when it ends.

Run as ``python -m phi3_export.export.coreai.convert JOB.json``; ``run_conversion`` does that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from phi3_export.export.coreai.artifact import DTYPES, ConversionJob, cache_shape
from phi3_export.export.coreai.contract import DECODE, INPUT_IDS, KEY_CACHE, LOGITS, POSITION, PREFILL, VALUE_CACHE
from phi3_export.memory import bound_heap, release_freed_memory
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint

ADDR_NO_RANDOMIZE = 0x0040000  # linux/personality.h


def _without_address_randomisation() -> None:
    """Re-execute this process with address space layout randomisation off (once; Linux only)."""
    import ctypes
    import os

    try:
        libc = ctypes.CDLL("libc.so.6")
        current = libc.personality(0xFFFFFFFF)
    except (OSError, AttributeError):
        return  # not Linux/glibc: the asset converts, its resource names may differ between runs
    if current == -1 or current & ADDR_NO_RANDOMIZE:
        return
    if libc.personality(current | ADDR_NO_RANDOMIZE) == -1:
        return
    os.execv(sys.executable, [sys.executable, "-m", "phi3_export.export.coreai.convert", *sys.argv[1:]])


def run_conversion(job: ConversionJob) -> None:
    """Convert in a child process; an interrupt or SIGTERM here ends the child too."""
    asset = Path(job.asset)
    job_file = asset.parent / ".coreai-job.json"
    job_file.write_text(json.dumps(dataclasses.asdict(job)))
    proc = subprocess.Popen([sys.executable, "-m", "phi3_export.export.coreai.convert", str(job_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        job_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        raise RuntimeError(f"Core AI conversion failed (exit {proc.returncode}): {lines[-1] if lines else 'no message'}")


def convert(job: ConversionJob) -> None:
    from phi3_export.arch import architecture
    from phi3_export.checkpoint import Checkpoint
    from phi3_export.checkpoint.config import architecture_name

    ckpt = Checkpoint(job.checkpoint)
    plan = architecture(architecture_name(ckpt.config, str(ckpt.folder / "config.json"))).plan(ckpt.config)
    qckpt = QuantizedCheckpoint(Path(job.quantized))
    program = _to_program(plan.decoder, qckpt, job)
    # The module, its exported programs and the converter are garbage now (their scales and
    # zero points are in the program's constants): the asset writer gets the room.
    gc.collect()
    release_freed_memory()
    _save(program, Path(job.asset), job.description)


def _to_program(decoder, qckpt: QuantizedCheckpoint, job: ConversionJob):
    from phi3_export.export.coreai.lib import coreai_torch
    from phi3_export.export.coreai.module import DecoderModule
    from phi3_export.export.coreai.weights import WeightSource

    ct = coreai_torch()
    dtype = DTYPES[job.precision]
    source = WeightSource(qckpt, dtype)
    module = DecoderModule(decoder, source, job.context_length).eval()
    converter = ct.TorchConverter(mode=ct.TorchConverter.Mode.RELEASE)
    # Example inputs for tracing: torch.empty never touches its pages, so the caches cost no memory.
    cache = cache_shape(decoder, job.context_length)
    for name, q_len in ((PREFILL, job.prefill_chunk), (DECODE, 1)):
        args = (torch.zeros(1, q_len, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                torch.empty(cache, dtype=dtype), torch.empty(cache, dtype=dtype))
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree pickling, deprecated in 2.13 (nothing of ours).
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
            program = torch.export.export(module, args=args).run_decompositions(ct.get_decomp_table())
        converter.add_exported_program(program, input_names=[INPUT_IDS, POSITION], output_names=[LOGITS],
                                       state_names=[KEY_CACHE, VALUE_CACHE], entrypoint_name=name)
        source.attach_codes(program)
    # coreai-torch prints a banner (and draws rich bars on a terminal).
    with contextlib.redirect_stdout(io.StringIO()), _seeded_graph_names():
        return converter.to_coreai()


@contextlib.contextmanager
def _seeded_graph_names():
    """coreai-core suffixes composite graph names with ``secrets.choice``: a seeded generator instead."""
    import random

    from coreai.authoring import graph_builder

    original = graph_builder.choice
    graph_builder.choice = random.Random(0).choice
    try:
        yield
    finally:
        graph_builder.choice = original


def _save(program, path: Path, description: str) -> None:
    """``AIProgram.save_asset`` without its in-memory copy of the whole asset, and without a date.

    coreai-core 1.0.0b3's ``save_asset`` hashes the bytecode with ``Path.read_bytes()``: a
    second copy of every weight (1.9 GB at Phi-3-mini) beside the program's own constants.
    The same steps here, the hash streamed; no creation date (for determinism). Private
    pieces of coreai-core, used at the version lib.py pins.
    """
    import hashlib

    from coreai.authoring.asset import _COREAI_PRODUCER, OSVersion, _AIModelAsset
    from coreai.runtime import AIModelAssetMetadata

    metadata = AIModelAssetMetadata()
    metadata.author = "phi3-export"
    metadata.model_description = description
    metadata._producer = _COREAI_PRODUCER
    path.mkdir(parents=True)
    asset = _AIModelAsset._create(path=str(path), metadata=metadata)
    bytecode = Path(asset._program_bytecode_path)
    program._save_bytecode(bytecode, minimum_os=OSVersion.v27)
    digest = hashlib.sha256()
    with bytecode.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    Path(asset._program_hash_path).write_bytes(digest.digest())
    meta_path = path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("creationDate", None)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    _without_address_randomisation()
    bound_heap()
    convert(ConversionJob(**json.loads(Path(sys.argv[1]).read_text())))
