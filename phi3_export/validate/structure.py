"""Checks that need no execution provider: what can be verified for DirectML or a phone here.

Each check is {"name", "passed": True | False | None, "detail"}; None means "not checked"
with the reason in the detail, never a guess.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}
# A KV cache preallocated for the full 131072-token context is what breaks phones and GPUs
# (onnxruntime-genai #550); no target should ship max_length at that size.
FULL_LONG_CONTEXT = 131072
MOBILE_ACCURACY_LEVEL = 4


def _check(name: str, passed: bool | None, detail: str) -> dict:
    return {"name": name, "passed": passed, "detail": detail}


def _graph(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def max_length_cap(config: dict, manifest_entry: dict) -> dict:
    length = config["search"]["max_length"]
    expected = manifest_entry.get("max_length")
    ok = length < FULL_LONG_CONTEXT and (expected is None or length == expected)
    return _check("max_length_cap", ok, f"genai_config search.max_length {length} (manifest {expected}, must be < {FULL_LONG_CONTEXT})")


def no_control_flow(model: onnx.ModelProto) -> dict:
    found = sorted({n.op_type for n in model.graph.node if n.op_type in CONTROL_FLOW_OPS})
    return _check("no_control_flow", not found, "no If/Loop/Scan nodes" if not found else f"control-flow nodes: {', '.join(found)}")


def dml_provider_options(config: dict) -> dict:
    options = config["model"]["decoder"]["session_options"].get("provider_options", [])
    ok = any("dml" in entry for entry in options)
    return _check("dml_provider_options", ok, f"provider_options {json.dumps(options)}")


def accuracy_level(model: onnx.ModelProto, expected: int) -> dict:
    levels = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            levels.add(next((a.i for a in node.attribute if a.name == "accuracy_level"), 0))
    if not levels:
        return _check("accuracy_level", None, "not checked: no MatMulNBits nodes (unquantized artifact)")
    return _check("accuracy_level", levels == {expected}, f"MatMulNBits accuracy_level {sorted(levels)}, expected {expected}")


def mobile_op_coverage(model: onnx.ModelProto) -> list[dict]:
    """NNAPI and Core ML EP coverage from ONNX Runtime's own mobile usability checker."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    logging.getLogger("usability_checker").setLevel(logging.ERROR)
    out = []
    for name, info in (
        ("nnapi_op_coverage", uc.check_nnapi_partitions(model, require_fixed_input_sizes=False)),
        ("coreml_op_coverage", uc.check_coreml_partitions(model, False, "coreml_supported_mlprogram_ops.md")),
    ):
        unsupported = sorted(info.unsupported_ops)
        detail = (f"{info.num_supported_nodes}/{info.num_nodes} nodes supported in {info.num_partitions} partition(s); "
                  f"unsupported ops: {', '.join(unsupported) or 'none'} (the rest runs on the CPU EP)")
        # Informational: contrib ops (MatMulNBits, GroupQueryAttention) stay on CPU by design.
        out.append({**_check(name, None, detail), "supported_nodes": info.num_supported_nodes, "nodes": info.num_nodes,
                    "partitions": info.num_partitions, "unsupported_ops": unsupported})
    for ep in ("xnnpack", "qnn"):
        out.append(_check(f"{ep}_op_coverage", None, f"not checked: ONNX Runtime ships no op list for the {ep} EP to check against"))
    return out


def structural_checks(folder: Path, genai_config: dict, manifest_entry: dict) -> list[dict]:
    """The checks for the artifact's target (from the manifest)."""
    model = _graph(folder)
    checks = [max_length_cap(genai_config, manifest_entry)]
    target = manifest_entry.get("target")
    if target == "dml":
        checks += [no_control_flow(model), dml_provider_options(genai_config)]
    if target == "mobile":
        checks += [accuracy_level(model, MOBILE_ACCURACY_LEVEL), *mobile_op_coverage(model)]
    return checks
