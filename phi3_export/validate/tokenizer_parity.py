"""Does the artifact's onnxruntime-genai tokenizer agree with the reference's transformers one?

Accuracy is computed on shared ids, which would hide a tokenizer that the artifact ships
broken (wrong merges, a missing added token, a different chat template): apps tokenize
with the artifact's files, so those must give the reference's ids and prompt text.
"""

from __future__ import annotations

import json
from pathlib import Path

PARITY_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What does `len([1, 2, 3])` return?"},
    {"role": "assistant", "content": "It returns 3."},
    {"role": "user", "content": "And len('héllo wörld')?"},
]


def reference_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    # tokenizer.json / tokenizer_config.json only: no remote code, no pickled vocab. The eval
    # text is tokenized whole and cut into windows, so no length limit applies here.
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=False)
    tokenizer.model_max_length = 1 << 62
    return tokenizer


def check(artifact: Path, ref, text: str) -> dict:
    """``ref``: the reference's transformers tokenizer (``reference_tokenizer``)."""
    import onnxruntime_genai as og

    config = og.Config(str(artifact))
    config.clear_providers()  # the tokenizer is the same on every provider; the CPU one is always there
    tokenizer = og.Tokenizer(og.Model(config))
    prompt = tokenizer.apply_chat_template(json.dumps(PARITY_MESSAGES), add_generation_prompt=True) if ref.chat_template else None
    return compare([int(t) for t in tokenizer.encode(text)], prompt, ref, text)


def compare(ours: list[int], ours_prompt: str | None, ref, text: str) -> dict:
    """The artifact's ids for ``text`` and its rendering of PARITY_MESSAGES against the reference's."""
    theirs = list(ref(text, add_special_tokens=False).input_ids)
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if mismatch is None and len(ours) != len(theirs):
        mismatch = min(len(ours), len(theirs))
    result = {
        "ids_equal": mismatch is None,
        "artifact_tokens": len(ours),
        "reference_tokens": len(theirs),
        "first_mismatch": mismatch,
    }
    if mismatch is not None:
        result["at_mismatch"] = {"artifact": ours[mismatch : mismatch + 5], "reference": theirs[mismatch : mismatch + 5]}
    if ref.chat_template:
        theirs_prompt = ref.apply_chat_template(PARITY_MESSAGES, tokenize=False, add_generation_prompt=True)
        result["chat_template_equal"] = ours_prompt == theirs_prompt
        if ours_prompt != theirs_prompt:
            result["chat_template"] = {"artifact": (ours_prompt or "")[:300], "reference": theirs_prompt[:300]}
    else:
        result["chat_template_equal"] = None  # the reference has no template to compare with
    result["passed"] = result["ids_equal"] and result["chat_template_equal"] is not False
    return result
