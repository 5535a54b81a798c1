"""Does the artifact's onnxruntime-genai tokenizer agree with the reference's transformers one?

Accuracy is computed on shared ids, which would hide a tokenizer that the artifact ships
broken (wrong merges, a missing added token, a different chat template): apps tokenize
with the artifact's files, so those must give the reference's ids and prompt text.

Three comparisons, all needed for ``passed``:
- the eval text's ids, tokenized whole (``ids_equal``). When they differ, the record says
  where: ``mismatch`` holds the line (1-based), the token within that line (1-based, in
  the whole-text tokenization) and a few token strings of context from each side, and
  ``lines_differ`` of ``lines`` counts the lines that tokenize differently on their own;
- the chat template's rendering of PARITY_MESSAGES (``chat_template_equal``);
- the ids of that rendered prompt (``chat_ids_equal``): text right after each chat
  special token, which plain eval text never has.
``detail`` is one line saying what differs (or that nothing does).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from pathlib import Path

PARITY_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What does `len([1, 2, 3])` return?"},
    {"role": "assistant", "content": "It returns 3."},
    {"role": "user", "content": "And len('héllo wörld')?"},
]
CONTEXT = 3  # tokens shown before the first difference (and up to CONTEXT - 1 after it)
PASSED = "ids and chat template identical"


def reference_tokenizer(checkpoint: Path):
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # tokenizer.json / tokenizer_config.json only: no remote code, no pickled vocab. The eval
    # text is tokenized whole and cut into windows, so no length limit applies here.
    # AutoTokenizer also reads config.json: a model type transformers lacks (phi3small) or a
    # published rope_scaling key makes it warn about the model, which is not loaded here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False)
            except (AttributeError, KeyError, TypeError, ValueError):
                # A config.json transformers cannot build (phi3_v: no such model type, and its
                # generic config trips over the rope block): tokenizer.json alone, through the
                # same tokenizers backend AutoTokenizer picks for Phi-3.
                from transformers.tokenization_utils_tokenizers import TokenizersBackend

                tokenizer = TokenizersBackend.from_pretrained(str(checkpoint))
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer.model_max_length = 1 << 62
    return tokenizer


def artifact_tokenizer(artifact: Path):
    """The artifact's tokenizer as apps build it: from genai_config.json and the tokenizer files
    (onnxruntime-extensions underneath); the model itself is not loaded."""
    import onnxruntime_genai as og

    config = og.Config(str(artifact))
    config.clear_providers()  # the tokenizer is the same on every provider; the CPU one is always there
    return og.Tokenizer(config)


def artifact_pieces(artifact: Path) -> Callable[[list[int]], list[str]]:
    """id -> token string as the artifact's own tokenizer.json has it (its ids may not be the reference's)."""
    path = Path(artifact) / "tokenizer.json"
    pieces: dict[int, str] = {}
    if path.is_file():
        spec = json.loads(path.read_text(encoding="utf-8"))
        vocab = (spec.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict):
            pieces.update({i: piece for piece, i in vocab.items()})
        else:  # Unigram: [[piece, score], ...]
            pieces.update({i: entry[0] for i, entry in enumerate(vocab)})
        pieces.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    return lambda ids: [pieces.get(i, f"<id {i}>") for i in ids]


def check(artifact: Path, ref, text: str) -> dict:
    """``ref``: the reference's transformers tokenizer (``reference_tokenizer``)."""
    tokenizer = artifact_tokenizer(artifact)

    def encode(s: str) -> list[int]:
        return [int(t) for t in tokenizer.encode(s)]

    prompt = tokenizer.apply_chat_template(json.dumps(PARITY_MESSAGES), add_generation_prompt=True) if ref.chat_template else None
    return compare(encode(text), prompt, ref, text, encode=encode, pieces=artifact_pieces(artifact))


def _first_difference(ours: list[int], theirs: list[int]) -> int | None:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if at is None and len(ours) != len(theirs):
        at = min(len(ours), len(theirs))
    return at


def _context(ids: list[int], at: int, pieces: Callable[[list[int]], list[str]]) -> list[str]:
    start = max(0, at - CONTEXT)
    shown = pieces(ids[start : at + CONTEXT])
    return ([".."] if start else []) + shown + ([".."] if at + CONTEXT < len(ids) else [])


def _show(tokens: list[str]) -> str:
    return "[" + ", ".join(t if t == ".." else repr(t) for t in tokens) + "]"


def _locate(ref, text: str, at: int) -> tuple[int, int | None, str]:
    """(line, token within the line, the line's text) of reference token ``at`` in ``text``."""
    try:
        starts = [s for s, _ in ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    except NotImplementedError:  # a Python-only tokenizer has no offsets: where its decoded prefix ends
        starts = None
        char = min(len(text), len(ref.decode(ref(text, add_special_tokens=False).input_ids[:at])))
    else:
        char = starts[at] if at < len(starts) else len(text)
    line_start = text.rfind("\n", 0, char) + 1
    line_end = text.find("\n", char)
    token = None if starts is None else at - min(bisect.bisect_left(starts, line_start), at) + 1
    return text.count("\n", 0, char) + 1, token, text[line_start : line_end if line_end >= 0 else len(text)]


def compare(ours: list[int], ours_prompt: str | None, ref, text: str, *, encode: Callable[[str], list[int]] | None = None,
            pieces: Callable[[list[int]], list[str]] | None = None) -> dict:
    """The artifact's ids for ``text`` and its rendering of PARITY_MESSAGES against the reference's.

    ``encode``: the artifact's tokenizer (text -> ids), for the per-line count and the chat
    prompt's ids; ``pieces``: the artifact's id -> token string (default: the reference's).
    """
    pieces = pieces or ref.convert_ids_to_tokens
    theirs = list(ref(text, add_special_tokens=False).input_ids)
    mismatch = _first_difference(ours, theirs)
    result = {
        "ids_equal": mismatch is None,
        "artifact_tokens": len(ours),
        "reference_tokens": len(theirs),
        "first_mismatch": mismatch,
    }
    problems = []
    if mismatch is not None:
        result["at_mismatch"] = {"artifact": ours[mismatch : mismatch + 5], "reference": theirs[mismatch : mismatch + 5]}
        line, token, line_text = _locate(ref, text, mismatch)
        where = {"line": line, "token": token, "line_text": line_text[:200],
                 "artifact": _context(ours, mismatch, pieces), "reference": _context(theirs, mismatch, ref.convert_ids_to_tokens)}
        result["mismatch"] = where
        problems.append(f"ids differ at line {line}" + (f", token {token}" if token else "") + f": artifact {_show(where['artifact'])} "
                        f"vs reference {_show(where['reference'])}")
        if encode is not None:
            lines = text.split("\n")
            expected = ref(lines, add_special_tokens=False).input_ids if lines else []
            result["lines"] = len(lines)
            result["lines_differ"] = sum(encode(s) != list(e) for s, e in zip(lines, expected))
            problems[-1] += f" ({result['lines_differ']} of {result['lines']} lines tokenize differently)"
    if ref.chat_template:
        theirs_prompt = ref.apply_chat_template(PARITY_MESSAGES, tokenize=False, add_generation_prompt=True)
        result["chat_template_equal"] = ours_prompt == theirs_prompt
        if ours_prompt != theirs_prompt:
            result["chat_template"] = {"artifact": (ours_prompt or "")[:300], "reference": theirs_prompt[:300]}
            at = next((i for i, (a, b) in enumerate(zip(ours_prompt or "", theirs_prompt)) if a != b),
                      min(len(ours_prompt or ""), len(theirs_prompt)))
            problems.append(f"chat template renders differently from character {at}: artifact {(ours_prompt or '')[at:at + 40]!r} "
                            f"vs reference {theirs_prompt[at:at + 40]!r}")
        if encode is not None:
            # Text right after each chat token (rstrip, the dummy prefix): the eval text has none.
            ours_ids = encode(theirs_prompt)
            ref_ids = list(ref(theirs_prompt, add_special_tokens=False).input_ids)
            at = _first_difference(ours_ids, ref_ids)
            result["chat_ids_equal"] = at is None
            if at is not None:
                result["chat_mismatch"] = {"token": at + 1, "artifact": _context(ours_ids, at, pieces),
                                           "reference": _context(ref_ids, at, ref.convert_ids_to_tokens)}
                problems.append(f"chat prompt ids differ at token {at + 1}: artifact {_show(result['chat_mismatch']['artifact'])} "
                                f"vs reference {_show(result['chat_mismatch']['reference'])}")
    else:
        result["chat_template_equal"] = None  # the reference has no template to compare with
    result["passed"] = (result["ids_equal"] and result["chat_template_equal"] is not False
                        and result.get("chat_ids_equal") is not False)
    result["detail"] = PASSED if result["passed"] else "; ".join(problems)
    return result


def check_with_transformers(folder: Path, ref_tokenizer, text: str) -> dict:
    """An Apple artifact's tokenizer files, read by transformers as swift-transformers reads them, vs the reference."""
    ours = reference_tokenizer(folder)
    prompt = (ours.apply_chat_template(PARITY_MESSAGES, tokenize=False, add_generation_prompt=True)
              if ref_tokenizer.chat_template else None)
    return compare(list(ours(text, add_special_tokens=False).input_ids), prompt, ref_tokenizer, text,
                   encode=lambda s: list(ours(s, add_special_tokens=False).input_ids))
