"""`validate` on a Core ML artifact.

Core ML prediction needs macOS 15; elsewhere it is reported "not run", never estimated.
What is checked everywhere: the package's structure (spec version, IO, states and their
shapes, op histogram, every linear's weight int blockwise at the bits the manifest says,
size on disk), tokenizer parity, and accuracy of the saved program itself, evaluated op by
op from ``model.mlmodel`` and ``weight.bin`` by ``coreml_program`` with fp16 rounding.
On macOS the package also runs through Core ML for real.
"""

from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path

import numpy as np

from phi3_export.export.coreml.contract import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, MLPACKAGE, VALUE_CACHE
from phi3_export.validate import accuracy, tokenizer_parity
from phi3_export.validate.coreml_program import CoreMLDecoder, MilProgram

READER = "mil-reader"  # the record's "provider" for the numpy evaluation of the saved program
MACOS_REASON = "Core ML prediction needs macOS 15 or iOS 18 (this machine: {os})"


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def structural_checks(program: MilProgram, entry: dict, settings: dict | None, folder: Path) -> tuple[list[dict], dict]:
    spec = program.spec
    desc = spec.description
    checks = [_check("coreml_spec_version", spec.specificationVersion >= 9,
                     f"specificationVersion {spec.specificationVersion} (9 = iOS 18 / macOS 15: states, int4 blockwise)")]
    inputs = {i.name for i in desc.input}
    outputs = [o.name for o in desc.output]
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in desc.state}
    checks.append(_check("coreml_io", inputs == {INPUT_IDS, CAUSAL_MASK} and outputs == [LOGITS],
                         f"inputs {sorted(inputs)}, outputs {outputs}"))
    ctx = entry.get("context_length")
    shapes_ok = set(states) == {KEY_CACHE, VALUE_CACHE} and all(s[3] == ctx for s in states.values())
    checks.append(_check("coreml_kv_states", shapes_ok, f"states {states}, context_length {ctx}"))
    histogram = Counter(op.type for op in program.block.operations)
    constexpr = {op.outputs[0].name: op for op in program.block.operations if op.type == "constexpr_blockwise_shift_scale"}
    linears, bits = [], {}  # by the linear op's name (layers_3_qkv_proj, lm_head): a tied LM head reads embed_tokens_weight
    for op in program.block.operations:
        if op.type != "linear":
            continue
        name, weight = op.outputs[0].name, op.inputs["weight"].arguments[0].name
        linears.append(name)
        if weight in constexpr:
            bits[name] = _bits_of(program, constexpr[weight])
    expected = (settings or {}).get("bits")
    overrides = {k: v for k, v in ((settings or {}).get("overrides") or {}).items() if v in ("int4", "int8")}
    wrong = [w for w in linears if w not in bits or (bits[w] != expected and not _overridden(w, overrides, bits[w]))]
    checks.append(_check("coreml_linear_weights_blockwise", expected in (4, 8) and not wrong,
                         f"{len(linears) - len(wrong)}/{len(linears)} linears read int{expected} blockwise weights"
                         + (f"; not: {wrong[:4]}" if wrong else "")))
    size = sum(p.stat().st_size for p in (folder / MLPACKAGE).rglob("*") if p.is_file())
    facts = {"op_histogram": dict(sorted(histogram.items())), "states": states, "linear_weight_bits": Counter(bits.values()),
             "package_bytes": size}
    return checks, facts


def _bits_of(program: MilProgram, op) -> int:
    t = program.types
    return {t.UINT4: 4, t.INT4: 4, t.UINT8: 8, t.INT8: 8}.get(program.constant_dtype(op, "data"), 0)


def _overridden(linear: str, overrides: dict, bits: int) -> bool:
    return any(linear.endswith(role) and precision == f"int{bits}" for role, precision in overrides.items())


def program_accuracy(program: MilProgram, ref, progress) -> dict:
    """Windows no longer than the program's context (the caller checks)."""
    decoder = CoreMLDecoder(program, "fp16")

    def artifact_logits():
        for seq in ref.sequences():
            decoder.reset()
            yield decoder(seq[:-1])

    summary = accuracy.compare_windows(ref.ids, ref.window_logits(progress), artifact_logits(), ref.window, ref.stride)
    return {**summary, "eval_text": ref.text_name, "eval_sha256": ref.text_sha, "eval_tokens": len(ref.ids),
            "window": ref.window, "stride": ref.stride,
            "how": "the saved ML program (model.mlmodel + weight.bin) evaluated op by op in numpy, fp16 activations"}


def macos_prediction(package: Path, ref, progress) -> dict:  # pragma: no cover - needs macOS 15
    """Core ML's own prediction on the first window, vs the reference (runs on macOS only)."""
    import coremltools as ct

    model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_AND_GPU)
    state = model.make_state()
    seq = ref.sequences()[0]
    ids = np.asarray(seq[:-1], np.int32)[None]
    out = model.predict({INPUT_IDS: ids, CAUSAL_MASK: np.zeros((1, 1, ids.shape[1], ids.shape[1]), np.float16)}, state=state)
    cmp = accuracy.Comparison()
    reference = next(iter(ref.window_logits(progress)))
    cmp.add(reference, np.asarray(out[LOGITS], np.float32)[0], np.asarray(seq[1:]))
    return cmp.summary()


def validate_coreml(artifact, ref, base: dict, common: dict, progress) -> list[dict]:
    package = artifact.folder / MLPACKAGE
    program = MilProgram(package)
    checks, facts = structural_checks(program, artifact.entry, artifact.manifest.get("settings"), artifact.folder)
    parity = tokenizer_parity.check_with_transformers(artifact.folder, ref.tokenizer, ref.text)
    checks.append(_check("tokenizer_parity", parity["passed"], "ids and chat template identical" if parity["passed"] else parity["detail"]))
    ctx = artifact.entry.get("context_length") or 0
    kv = None
    if KEY_CACHE in facts["states"]:  # a package without it already failed coreml_kv_states
        layers, _, kv_heads, _, head_dim = facts["states"][KEY_CACHE]
        per_token = 2 * layers * kv_heads * head_dim * 2  # keys + values, fp16
        kv = {"per_token": per_token, "max_length": ctx, "at_max_length": per_token * ctx}
    record = {**base, "checks": checks, "tokenizer": parity, "coreml": facts, "kv_cache_bytes": kv}
    records = []
    progress.message(f"validate: {artifact.name} (saved ML program, numpy)")
    if ref.window > ctx:
        records.append({**record, "provider": READER, "status": "not run",
                        "reason": f"--window {ref.window} exceeds the artifact's context length {ctx}", **common})
    else:
        records.append({**record, "provider": READER, "status": "ok", "accuracy": program_accuracy(program, ref, progress),
                        "speed": {"status": "not run", "reason": "the numpy reader measures accuracy, not device speed"},
                        **common})
    if platform.system() == "Darwin":  # pragma: no cover - needs macOS 15
        records.append({**record, "provider": "coreml", "status": "ok", "accuracy_first_window": macos_prediction(package, ref, progress),
                        **common})
    else:
        records.append({**record, "provider": "coreml", "status": "not run",
                        "reason": MACOS_REASON.format(os=f"{platform.system()} {platform.release()}"), **common})
    return records
