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
    """A multi-turn chat with one loaded artifact (the interactive `phi3-export chat`).

    ``images`` (image + text artifacts only) belong to the conversation: their tags go in the
    first user message, and every turn sends them again with the whole history, as the
    runtime's processor expects (validate/images.py: our HD transform at the artifact's crop
    count, or with ``runtime_processor`` onnxruntime-genai's own).
    """

    def __init__(self, artifact: Path, image_paths: tuple[Path, ...] = (), runtime_processor: bool = False):
        from phi3_export.validate.images import ImagePrompts, is_vision, load_image

        artifact = Path(artifact)
        if not (artifact / "genai_config.json").is_file():
            raise Phi3ExportError(f"{artifact}: no genai_config.json (not an ONNX artifact folder)")
        genai = read_json(artifact / "genai_config.json")  # a broken file is one line, before the runtime sees it
        if image_paths and not is_vision(genai):
            kind = (genai.get("model") or {}).get("type")
            raise Phi3ExportError(f"{artifact}: a text-only artifact (genai_config type {kind!r}, no vision model) "
                                  "takes no --image")
        # Every image decoded by PIL before the runtime sees one: its decoder exit(1)s on a non-PNG/JPEG file.
        self.images = [load_image(p) for p in image_paths]
        if image_paths:
            from phi3_export.validate.images import processor_facts

            processor_facts(artifact)  # a missing processor_config.json is one line, before the runtime loads
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(artifact))
        self.tokenizer = og.Tokenizer(self.model)
        self.prompts = ImagePrompts(og, self.model, artifact) if self.images else None
        self.runtime_processor = runtime_processor
        self.context_length = int((genai.get("model") or {}).get("context_length") or 0) or None
        self.messages: list[dict[str, str]] = []

    def reply(self, user_message: str, max_new_tokens: int = 64, remember: bool = True) -> Generation:
        if self.images and not self.messages:
            from phi3_export.validate.images import tagged

            user_message = tagged(user_message, len(self.images))
        messages = self.messages + [{"role": "user", "content": user_message}]
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        if self.prompts is None:
            result = generate(self.og, self.model, self.tokenizer, prompt, max_new_tokens, limit=self.context_length)
        else:
            inputs = self.prompts.build(prompt, self.images, self.runtime_processor)
            result = generate(self.og, self.model, self.tokenizer, prompt, max_new_tokens, inputs=inputs,
                              limit=self.context_length)
        if remember:
            self.messages = messages + [{"role": "assistant", "content": result.text}]
        return result


def generate(og, model, tokenizer, prompt: str, max_new_tokens: int, inputs=None, limit: int | None = None) -> Generation:
    """Greedy answer to a templated ``prompt``; ``inputs``: an image prompt's PromptInputs (validate/images.py);
    ``limit``: the model's context length (the prompt and the answer must fit it)."""
    ids = tokenizer.encode(prompt) if inputs is None else inputs.ids[0]
    if limit and len(ids) + max_new_tokens > limit:
        images = f" ({sum(inputs.image_tokens)} of them image tokens)" if inputs is not None else ""
        raise Phi3ExportError(f"the prompt is {len(ids)} tokens{images}: with --max-new-tokens {max_new_tokens} it exceeds "
                              f"the artifact's context length {limit}")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    if inputs is None:
        generator.append_tokens(ids)
    else:
        generator.set_inputs(inputs.tensors)
    generator.generate_next_token()
    first = time.perf_counter()
    new = [int(generator.get_next_tokens()[0])]
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    end = time.perf_counter()
    decode_rate = (len(new) - 1) / (end - first) if len(new) > 1 and end > first else 0.0
    return Generation(prompt, tokenizer.decode(new), len(ids), len(new), first - start, decode_rate)
