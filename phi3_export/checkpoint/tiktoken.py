"""Phi-3-small's tokenizer: tiktoken cl100k ranks plus added tokens, as tokenizer.json.

Published Phi-3-small checkpoints ship no tokenizer.json: their tokenizer is remote code
(``tokenization_phi3_small.Phi3SmallTokenizer``) over tiktoken's cl100k_base ranks, shipped
as ``cl100k_base.tiktoken``, plus 96 special tokens. This module holds those facts (the
fixture tokenizer uses the split pattern too) and builds, without running remote code,

- ``tokenizer.json``: byte-level BPE (transformers' ``TikTokenConverter``: vocab = the ranks,
  merges = every split of a token into two ranked tokens, in rank order, ``ignore_merges``),
  pre-tokenizer ``Sequence[Split(CL100K_PATTERN, isolated), ByteLevel(no prefix space, no
  regex)]``, ByteLevel decoder; every published special token as a special added token
  (not normalized, no strip) at its published id.
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` (transformers then reads
  tokenizer.json as written; ``GPT2Tokenizer`` would rebuild the pre-tokenizer with GPT-2's
  regex), bos = eos = pad = ``<|endoftext|>`` as the published class sets them, nothing
  added around the text, the chat template, ``added_tokens_decoder``.

A ranks file (``.tiktoken``) is text, one token a line: ``base64(token bytes) SP rank LF``;
empty lines are skipped. Ranks must be 0..n-1, each once, tokens distinct, and all 256
single bytes ranked (byte-level BPE needs them). The file is read here, never through
``tiktoken.load`` (which caches any path it reads in a temp folder keyed by the path, so a
changed file at the same path would be read stale); tiktoken itself is not needed.

Published ids (tokenization_phi3_small.py): cl100k's ranks are 0..100255; the special tokens
fill 100256..100351 with no gap (``<|dummy_id_2|>`` 100256, ``<|endoftext|>`` 100257, the fim
tokens 100258-100260, ``<|system|>`` 100261, ``<|user|>`` 100262, ``<|assistant|>`` 100263,
``<|dummy_id_0|>``/``<|dummy_id_1|>`` 100264-100265, ``<|end|>`` 100266, ``<|dummy_id_3..11|>``
100267-100275, ``<|endofprompt|>`` 100276, ``<|dummy_id_12..86|>`` 100277-100351): 100352 ids,
the config's vocab_size. A ranks file of n ranks gets them at n + (published id - 100256): the
published ids for cl100k_base itself, a contiguous table for a smaller test vocabulary.

Split pattern: ``CL100K_PATTERN`` is cl100k's pattern as tiktoken published it first (and as
``TikTokenConverter`` and Llama-3's tokenizer.json write it), which onnxruntime-extensions
runs as transformers does. The remote code takes the pattern of the installed tiktoken; newer
releases spell it with possessive quantifiers and an extra ``\\s++$`` alternative. The two
split identically except for a whitespace run that holds a newline and reaches the end of
the text (or of a run between special tokens) with more whitespace after its last newline:
``"x \\n "`` is ``"x", " \\n", " "`` here and ``"x", " \\n "`` in newer tiktoken.
(onnxruntime-extensions 0.18 did not run the newer alternative consistently: measured.)
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

from phi3_export.errors import Phi3ExportError

# tiktoken's cl100k_base pre-tokenizer pattern (its ``pat_str``): contractions, letter runs
# with one leading non-letter, numbers of 1-3 digits, punctuation runs, newlines, spaces.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CL100K_RANKS = 100256  # ranks in cl100k_base.tiktoken (0..100255)


def _phi3_small_added() -> tuple[tuple[str, int], ...]:
    """(token, published id) of every Phi-3-small special token, in id order."""
    named = {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>", 100260: "<|fim_suffix|>",
             100261: "<|system|>", 100262: "<|user|>", 100263: "<|assistant|>", 100266: "<|end|>",
             100276: "<|endofprompt|>"}
    dummy = [100264, 100265, 100256, *range(100267, 100276), *range(100277, 100352)]  # <|dummy_id_0|>, <|dummy_id_1|>, ...
    named.update({i: f"<|dummy_id_{k}|>" for k, i in enumerate(dummy)})
    return tuple((named[i], i) for i in sorted(named))


# tokenizer_config.json's chat template of the published Phi-3-small instruct models: a bos
# (<|endoftext|>) first, one newline after each role tag.
PHI3_SMALL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class TiktokenSpec:
    """A model whose tokenizer is tiktoken ranks plus added tokens (an architecture names it)."""

    model: str  # for messages
    ranks_file: str  # the file name its checkpoints ship the ranks in
    base_ranks: int  # ranks of the published file: the added tokens' ids count from there
    added: tuple[tuple[str, int], ...]  # (token, published id), all special
    bos: str
    eos: str
    chat_template: str
    pattern: str = CL100K_PATTERN

    def added_ids(self, ranks: int) -> list[tuple[str, int]]:
        return [(token, ranks + i - self.base_ranks) for token, i in self.added]


PHI3_SMALL = TiktokenSpec(model="Phi-3-small", ranks_file="cl100k_base.tiktoken", base_ranks=CL100K_RANKS,
                          added=_phi3_small_added(), bos="<|endoftext|>", eos="<|endoftext|>",
                          chat_template=PHI3_SMALL_CHAT_TEMPLATE)
# Architecture.tiktoken_tokenizer names one of these.
SPECS = {"phi-3-small": PHI3_SMALL}

_RANK = re.compile(rb"[0-9]{1,12}")


def read_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a ``.tiktoken`` file (format: module docstring), checked; ordered by rank."""
    def bad(line: int, what: str) -> Phi3ExportError:
        return Phi3ExportError(f"{path}: line {line}: {what} (a tiktoken ranks file has lines 'BASE64TOKEN RANK')")

    ranks: dict[bytes, int] = {}
    first_line: dict[int, int] = {}
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2:
                    raise bad(number, f"expected 2 fields, got {len(fields)}")
                token_b64, rank_text = fields
                try:
                    token = base64.b64decode(token_b64, validate=True)
                except (binascii.Error, ValueError):
                    raise bad(number, f"token {token_b64[:40].decode('ascii', 'replace')!r} is not base64") from None
                if not token:
                    raise bad(number, "empty token")
                if not _RANK.fullmatch(rank_text):
                    raise bad(number, f"rank {rank_text[:40].decode('ascii', 'replace')!r} is not a non-negative integer")
                rank = int(rank_text)
                if token in ranks:
                    raise bad(number, f"token {token!r} is also at line {first_line[ranks[token]]}")
                if rank in first_line:
                    raise bad(number, f"rank {rank} is also at line {first_line[rank]}")
                ranks[token] = rank
                first_line[rank] = number
    except OSError as exc:
        raise Phi3ExportError(f"{path}: cannot read the tiktoken ranks file ({exc.strerror or exc})") from None
    if not ranks:
        raise Phi3ExportError(f"{path}: no ranks (an empty tiktoken ranks file)")
    if max(first_line) != len(ranks) - 1:
        missing = next(r for r in range(len(ranks)) if r not in first_line)
        raise Phi3ExportError(f"{path}: rank {missing} is missing: ranks must be 0..{len(ranks) - 1} "
                              f"({len(ranks)} tokens), the highest is {max(first_line)}")
    unranked = [b for b in range(256) if bytes([b]) not in ranks]
    if unranked:
        raise Phi3ExportError(f"{path}: byte 0x{unranked[0]:02x} has no rank ({len(unranked)} of the 256 single bytes "
                              "missing): not a byte-level BPE ranks file")
    return dict(sorted(ranks.items(), key=lambda item: item[1]))


def _tokenizer_json(ranks: dict[bytes, int], spec: TiktokenSpec) -> dict:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks  # read and checked by read_ranks (see the module docstring on tiktoken.load)

    # The converter's own added tokens would take the next free ids; the published ids are set below.
    doc = json.loads(Converter(vocab_file="ranks", pattern=spec.pattern).converted().to_str())
    doc["added_tokens"] = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for token, i in spec.added_ids(len(ranks))]
    return doc


def build_tokenizer(ranks_path: Path, spec: TiktokenSpec, out: Path, *, vocab_size: int, chat_template: str | None = None,
                    model_max_length: int | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json (formats: module docstring) into ``out``.

    ``vocab_size`` (config.json's) must hold every id; ``chat_template``: the checkpoint's own,
    else the spec's. The same ranks file gives the same bytes.
    """
    from tokenizers import Tokenizer

    ranks = read_ranks(ranks_path)
    added = spec.added_ids(len(ranks))
    size = len(ranks) + len(added)
    if size > vocab_size:
        raise Phi3ExportError(f"{ranks_path}: {len(ranks)} ranks and {spec.model}'s {len(added)} special tokens make {size} "
                              f"ids, more than config.json's vocab_size {vocab_size} (is this {spec.ranks_file}?)")
    tokenizer = Tokenizer.from_str(json.dumps(_tokenizer_json(ranks, spec)))
    for token, i in added:  # tokenizers numbers added tokens itself: they must have come out at their ids
        if tokenizer.token_to_id(token) != i:
            raise Phi3ExportError(f"{ranks_path}: {token} got id {tokenizer.token_to_id(token)}, not {i}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": False, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": token, **entry} for token, i in added},
        "bos_token": spec.bos, "chat_template": chat_template if chat_template is not None else spec.chat_template,
        "clean_up_tokenization_spaces": False, "eos_token": spec.eos, "pad_token": spec.eos,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **({"model_max_length": model_max_length} if model_max_length else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
