"""`validate` on a Core AI artifact, with Apple's own runtime (coreai-core; on Linux a CPU reference).

Checked: the asset's functions and their IO and states, its int4 code bytes against an ONNX
artifact of the same quantize run when there is one, (shapes against the context length
the manifest states), that every linear of the model plan reads int blockwise weights at
the manifest's bits, tokenizer parity, and the accuracy of prefill + decode through the
runtime against the reference on the first ``--coreai-tokens`` tokens of the first
``--coreai-windows`` windows of the eval text (the Linux runtime is a slow single-threaded
interpreter). Speed is "not
run": on Linux the runtime is a reference interpreter, not a device.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path

import numpy as np

from phi3_export.arch import architecture
from phi3_export.checkpoint.config import architecture_name
from phi3_export.export.coreai.contract import (
    AIMODEL,
    CONFIG,
    DECODE,
    KEY_CACHE,
    PREFILL,
    VALUE_CACHE,
)
from phi3_export.validate import accuracy, tokenizer_parity

PROVIDER = "coreai"
# Measured here (coreai-core 1.0.0b3, Linux): SmolLM2-135M took 311 s for one 64-token prefill
# call and 12 s per decode step: about 25 million multiply-adds per second, one thread.
LINUX_RUNTIME_MACS_PER_S = 25e6
SPEED_REASON = ("needs an Apple device with iOS/macOS 27 (the runtime here, {os}, is Apple's CPU reference "
                "interpreter: it checks accuracy, not speed)")
BLOCKWISE = "coreai.blockwise_shift_scale"


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _ops(graph):
    for region in graph.operation.regions:
        for block in region.blocks:
            for op in block.operations:
                yield op
                yield from _ops(op) if op.regions else ()


def _expected_linears(folder: Path) -> int:
    """Quantizable linears of the model plan (the artifact's config.json), LM head included."""
    config = json.loads((folder / "config.json").read_text())
    plan = architecture(architecture_name(config, str(folder / "config.json"))).plan(config)
    per_layers = sum(1 for layer in plan.decoder.layers for linear in layer.linears() if linear.quantize)
    return per_layers + 1


def structural_checks(folder: Path, entry: dict, settings: dict | None) -> tuple[list[dict], dict]:
    from coreai.authoring.asset import AIModelAsset

    config = json.loads((folder / CONFIG).read_text())
    asset = AIModelAsset.load(folder / AIMODEL)
    program = asset.program
    checks, facts = [], {}
    graphs = {name: program._get_graph(name) for name in (PREFILL, DECODE)}
    checks.append(_check("coreai_functions", all(g is not None for g in graphs.values()),
                         f"functions {sorted(n for n, g in graphs.items() if g is not None)} of {PREFILL}, {DECODE}"))
    ctx = entry.get("context_length")
    states = config.get("states", {})
    shapes_ok = set(states) == {KEY_CACHE, VALUE_CACHE} and all(s["shape"][3] == ctx for s in states.values())
    checks.append(_check("coreai_kv_states", shapes_ok, f"states {({k: v['shape'] for k, v in states.items()})}, context_length {ctx}"))
    expected_bits = (settings or {}).get("bits")
    blockwise: Counter = Counter()
    histogram: Counter = Counter()
    graph = graphs[DECODE]
    if graph is not None:
        for op in _ops(graph):
            histogram[op.name] += 1
            if op.name == BLOCKWISE:
                blockwise[str(op.operands[0].type).rsplit("x", 1)[-1].rstrip(">")] += 1
    wanted = _expected_linears(folder)
    overrides = {v for v in ((settings or {}).get("overrides") or {}).values() if v in ("int4", "int8")}
    allowed = {f"ui{expected_bits}"} | {f"ui{v[3:]}" for v in overrides}
    found = sum(blockwise.values())
    checks.append(_check("coreai_linear_weights_blockwise",
                         expected_bits in (4, 8) and found >= wanted - 1 and set(blockwise) <= allowed,
                         f"{found} blockwise int weights ({dict(blockwise)}) for {wanted} linears of the plan "
                         "(a tied LM head shares the table's)"))
    facts["op_histogram"] = dict(sorted(histogram.items()))
    facts["blockwise_weights"] = dict(blockwise)
    facts["asset_bytes"] = sum(p.stat().st_size for p in (folder / AIMODEL).rglob("*") if p.is_file())
    facts["states"] = {k: v["shape"] for k, v in states.items()}
    return checks, facts


def _initializer_bytes(model_dir: Path, tensor) -> bytes:
    """An initializer's raw bytes, inline or in the external data file (read at its offset only)."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor.raw_data
    info = {e.key: e.value for e in tensor.external_data}
    with (model_dir / Path(info["location"]).name).open("rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


def onnx_codes_check(artifact) -> dict | None:
    """Every MatMulNBits code tensor of an ONNX artifact from the same quantize run appears, byte for
    byte, in the asset (None when the OUT folder has no ONNX artifact). Each is located by 64 bytes
    from its middle, then compared whole: one scan per tensor, no parse of the asset."""
    import mmap

    import onnx

    from phi3_export.manifest import find_artifacts

    siblings = [a for a in find_artifacts(artifact.folder.parent) if a.entry.get("format") == "onnx"]
    if not siblings:
        return None
    source = siblings[0]
    model = onnx.load(str(source.folder / "model.onnx"), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    names = [n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] in initializers]
    missing = []
    with (artifact.folder / AIMODEL / "main.mlirb").open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        for name in names:
            data = _initializer_bytes(source.folder, initializers[name])
            middle = len(data) // 2
            probe = data[middle : middle + 64]
            at, found = blob.find(probe), False
            while at >= 0 and not found:
                found = at >= middle and blob[at - middle : at - middle + len(data)] == data
                at = blob.find(probe, at + 1)
            if not found:
                missing.append(name)
    return _check("coreai_codes_match_onnx", bool(names) and not missing,
                  f"{len(names) - len(missing)}/{len(names)} MatMulNBits code tensors of {source.name} found byte for byte"
                  + (f"; not: {missing[:3]}" if missing else ""))


def runtime_accuracy(folder: Path, ref, windows: int, tokens: int, progress) -> dict:
    """The first ``tokens`` of each of the first ``windows`` windows: the reference's window logits
    are causal, so a prefix of them is the reference for a prefix of the window."""
    from phi3_export.validate.coreai_runtime import CoreAIDecoder

    decoder = CoreAIDecoder(folder)
    result = accuracy.Comparison()
    ids = np.asarray(ref.ids)
    chosen = accuracy.windows(len(ref.ids), ref.window, ref.stride)[:windows]
    try:
        for (start, first), reference in zip(chosen, ref.window_logits(progress)):
            sequence = ids[start : start + min(ref.window, tokens) + 1]
            decoder.reset()
            logits = decoder([int(t) for t in sequence[:-1]])
            result.add(reference[first : len(sequence) - 1], logits[first : len(sequence) - 1], sequence[first + 1 :])
    finally:
        decoder.close()
    summary = result.summary()
    return {**summary, "eval_text": ref.text_name, "eval_sha256": ref.text_sha, "eval_tokens": len(ref.ids),
            "window": ref.window, "stride": ref.stride, "windows": len(chosen), "tokens_per_window": min(ref.window, tokens),
            "how": f"Apple's Core AI runtime: {PREFILL} in chunks of {decoder.chunk}, then {DECODE}; "
                   f"{decoder.config['precision']} program"}


def validate_coreai(artifact, ref, base: dict, common: dict, progress, windows: int, tokens: int) -> list[dict]:
    from phi3_export.validate.coreai_runtime import describe_in_subprocess

    folder = artifact.folder
    try:  # first in a child process: a damaged asset can crash the runtime's native loader
        describe_in_subprocess(folder)
    except Exception as exc:  # noqa: BLE001 - the finding itself
        check = _check("coreai_loads", False, f"the Core AI runtime could not load model.aimodel: {str(exc).splitlines()[0]}")
        return [{**base, "provider": PROVIDER, "checks": [check], "status": "not run",
                 "reason": "the asset does not load", **common}]
    checks, facts = structural_checks(folder, artifact.entry, artifact.manifest.get("settings"))
    codes = onnx_codes_check(artifact)
    if codes is not None:
        checks.append(codes)
    checks.insert(0, _check("coreai_loads", True, f"model.aimodel loads in the Core AI runtime with {PREFILL} and {DECODE}"))
    parity = tokenizer_parity.check_with_transformers(folder, ref.tokenizer, ref.text)
    checks.append(_check("tokenizer_parity", parity["passed"], "ids and chat template identical" if parity["passed"] else parity["detail"]))
    config = json.loads((folder / CONFIG).read_text())
    ctx = artifact.entry.get("context_length") or 0
    layers, _, kv_heads, _, head_dim = config["states"][KEY_CACHE]["shape"]
    element = 2 if config.get("precision") == "float16" else 4
    per_token = 2 * layers * kv_heads * head_dim * element
    record = {**base, "provider": PROVIDER, "checks": checks, "tokenizer": parity, "coreai": facts,
              "kv_cache_bytes": {"per_token": per_token, "max_length": ctx, "at_max_length": per_token * ctx},
              "speed": {"status": "not run", "reason": SPEED_REASON.format(os=f"{platform.system()} {platform.release()}")}}
    if ref.window > ctx:
        return [{**record, "status": "not run", "reason": f"--window {ref.window} exceeds the artifact's context length {ctx}", **common}]
    fed = windows * min(ref.window, tokens)
    estimate = f", about {fed * base['weights'] / LINUX_RUNTIME_MACS_PER_S / 60:.0f} min here" if base.get("weights") else ""
    progress.message(f"validate: {artifact.name} (Core AI runtime: {windows} window(s) of {min(ref.window, tokens)} tokens"
                     f"{estimate}; --coreai-tokens sets how many)")
    return [{**record, "status": "ok", "accuracy": runtime_accuracy(folder, ref, windows, tokens, progress), **common}]
