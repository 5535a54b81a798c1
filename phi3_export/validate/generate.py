"""Greedy chat generation through onnxruntime-genai, the runtime apps use."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json


@dataclass
class Generation:
    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float


def chat(artifact: Path, user_message: str, max_new_tokens: int = 64) -> Generation:
    """One user message, answered greedily."""
    return Conversation(artifact).reply(user_message, max_new_tokens, remember=False)


class Conversation:
    """A multi-turn chat with one loaded artifact (the interactive `phi3-export chat`)."""

    def __init__(self, artifact: Path):
        import onnxruntime_genai as og

        artifact = Path(artifact)
        if not (artifact / "genai_config.json").is_file():
            raise Phi3ExportError(f"{artifact}: no genai_config.json (not an ONNX artifact folder)")
        read_json(artifact / "genai_config.json")  # a broken file is one line, before the runtime sees it
        self.og = og
        self.model = og.Model(str(artifact))
        self.tokenizer = og.Tokenizer(self.model)
        self.messages: list[dict[str, str]] = []

    def reply(self, user_message: str, max_new_tokens: int = 64, remember: bool = True) -> Generation:
        messages = self.messages + [{"role": "user", "content": user_message}]
        result = _generate(self.og, self.model, self.tokenizer, messages, max_new_tokens)
        if remember:
            self.messages = messages + [{"role": "assistant", "content": result.text}]
        return result


def _generate(og, model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int) -> Generation:
    prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    generator.generate_next_token()
    first = time.perf_counter()
    new = [int(generator.get_next_tokens()[0])]
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    end = time.perf_counter()
    decode_rate = (len(new) - 1) / (end - first) if len(new) > 1 and end > first else 0.0
    return Generation(prompt, tokenizer.decode(new), len(ids), len(new), first - start, decode_rate)
