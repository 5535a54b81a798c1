"""The app samples parse (tree-sitter grammars; no Android SDK or Xcode here) and use the bundle's real names."""

from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_kotlin
import tree_sitter_swift

from phi3_export.export.coreml.contract import CAUSAL_MASK, INPUT_IDS, LOGITS, MLPACKAGE
from phi3_export.package.targets import COREML_DIR, ONNX_DIR

MOBILE = Path(__file__).resolve().parents[1] / "mobile"
GRAMMARS = {".kt": tree_sitter_kotlin, ".kts": tree_sitter_kotlin, ".swift": tree_sitter_swift}
SOURCES = sorted(p for p in MOBILE.rglob("*") if p.suffix in GRAMMARS)


def _first_error(node):
    if node.type == "ERROR" or node.is_missing:
        return node
    for child in node.children:
        found = _first_error(child)
        if found is not None:
            return found
    return None


def _parse(source: bytes, suffix: str):
    return tree_sitter.Parser(tree_sitter.Language(GRAMMARS[suffix].language())).parse(source)


def test_there_are_samples_for_both_platforms():
    assert {p.suffix for p in SOURCES} >= {".kt", ".kts", ".swift"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(MOBILE)))
def test_sample_source_parses(path):
    tree = _parse(path.read_bytes(), path.suffix)
    error = _first_error(tree.root_node)
    assert error is None, f"{path}:{error.start_point[0] + 1}:{error.start_point[1] + 1}: syntax error near {error.text[:40]!r}"


def test_the_check_catches_a_syntax_error():
    assert _first_error(_parse(b"class A { fun f( { }", ".kt").root_node) is not None
    assert _first_error(_parse(b"func f( { let = }", ".swift").root_node) is not None


def test_samples_use_the_bundle_layout_and_model_io():
    kotlin = (MOBILE / "android/app/src/main/java/ai/phi3export/sample/MainActivity.kt").read_text()
    assert f'"phi3/{ONNX_DIR}"' in kotlin and '"genai_config.json"' in kotlin
    swift = (MOBILE / "ios/Sources/Phi3Chat/Phi3CoreMLModel.swift").read_text()
    for name in (MLPACKAGE, INPUT_IDS, CAUSAL_MASK, LOGITS, "coreml_config.json"):
        assert f'"{name}"' in swift, name
    assert f"phi3-bundle/{COREML_DIR}" in (MOBILE / "ios/Sources/Phi3Chat/ChatView.swift").read_text()


def test_core_ai_sample_uses_the_asset_contract():
    from phi3_export.export.coreai import contract

    swift = (MOBILE / "ios/Sources/Phi3Chat/Phi3CoreAIModel.swift").read_text()
    for name in (contract.AIMODEL, contract.CONFIG, contract.INPUT_IDS, contract.POSITION, contract.KEY_CACHE,
                 contract.VALUE_CACHE, contract.LOGITS, contract.PREFILL, contract.DECODE):
        assert f'"{name}"' in swift, name
    assert f"iOS {contract.MINIMUM_OS['iOS']}" in swift and f"macOS {contract.MINIMUM_OS['macOS']}" in swift
