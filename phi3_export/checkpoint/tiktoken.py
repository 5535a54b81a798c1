"""Phi-3-small's tokenizer: tiktoken cl100k ranks plus added tokens, as tokenizer.json.

Published Phi-3-small checkpoints ship no tokenizer.json: their tokenizer is tiktoken's
cl100k_base ranks (a ``.tiktoken`` file of base64 token + rank lines) and a few added
tokens, in remote code. This module holds the facts both the fixture tokenizer and the
conversion of a real ranks file use.
"""

from __future__ import annotations

# tiktoken's cl100k_base pre-tokenizer pattern (its ``pat_str``): contractions, letter runs
# with one leading non-letter, numbers of 1-3 digits, punctuation runs, newlines, spaces.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
