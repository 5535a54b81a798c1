"""genai_config.json: what onnxruntime-genai needs to run the decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi3_export.arch.plan import ModelPlan
from phi3_export.export.onnx.targets import ResolvedTarget

STOP_TOKENS = ("<|end|>", "<|endoftext|>")


def _token_ids(tokenizer_json: Path, tokens: tuple[str, ...]) -> list[int]:
    if not tokenizer_json.is_file():
        return []
    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    return [t["id"] for t in added if t["content"] in tokens]


def genai_config(config: dict[str, Any], plan: ModelPlan, target: ResolvedTarget, tokenizer_json: Path) -> dict[str, Any]:
    shape = plan.decoder
    eos = config.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    # Chat turns end with <|end|>: generation must stop there too, not only at <|endoftext|>.
    for token_id in _token_ids(tokenizer_json, STOP_TOKENS):
        if token_id not in eos_ids:
            eos_ids.append(token_id)
    providers = [{name: dict(options)} for name, options in target.providers.items()]
    doc = {
        "model": {
            "bos_token_id": config.get("bos_token_id", 1),
            # The artifact's RoPE tables and KV cache stop at max_length: say so.
            "context_length": target.max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": "model.onnx",
                "head_size": shape.head_dim,
                "hidden_size": shape.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": shape.heads,
                "num_hidden_layers": len(shape.layers),
                "num_key_value_heads": shape.kv_heads,
            },
            "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
            "pad_token_id": config.get("pad_token_id", eos_ids[0] if eos_ids else 0),
            "type": plan.genai_type,
            "vocab_size": shape.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": target.max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    if plan.image is not None:
        add_image_sections(doc, providers)
    return doc


def add_image_sections(doc: dict[str, Any], providers: list) -> None:
    """onnxruntime-genai's phi3v layout: the decoder takes inputs_embeds; embedding.onnx and vision.onnx
    (with its processor config) come before it."""
    model = doc["model"]
    inputs = model["decoder"]["inputs"]
    del inputs["input_ids"]
    inputs["inputs_embeds"] = "inputs_embeds"
    session = {"log_id": "onnxruntime-genai", "provider_options": providers}
    model["embedding"] = {
        "filename": "embedding.onnx", "session_options": session,
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    model["vision"] = {
        "filename": "vision.onnx", "config_filename": "processor_config.json", "session_options": session,
        "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
        "outputs": {"image_features": "image_features"},
    }


def write_genai_config(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=4, sort_keys=True) + "\n")
