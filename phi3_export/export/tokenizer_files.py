"""Tokenizer and licence files every artifact folder carries, copied from the checkpoint.

A checkpoint whose tokenizer.json was built from tiktoken ranks (checkpoint/tiktoken.py) gives
the built tokenizer.json and tokenizer_config.json instead of its own tokenizer files
(``Checkpoint.tokenizer_files``); the ranks file itself is not copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phi3_export.checkpoint.reader import Checkpoint


def copy_tokenizer_files(ckpt: Checkpoint, out: Path) -> None:
    for path in ckpt.tokenizer_files():
        shutil.copyfile(path, out / path.name)
    # transformers 5 keeps the chat template in chat_template.jinja; onnxruntime-genai
    # reads it from tokenizer_config.json, so put it there too.
    template, config = out / "chat_template.jinja", out / "tokenizer_config.json"
    if template.is_file() and config.is_file():
        doc = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" not in doc:
            doc["chat_template"] = template.read_text(encoding="utf-8")
            config.write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    license_file = ckpt.license_file()
    if license_file is not None:
        shutil.copyfile(license_file, out / license_file.name)
