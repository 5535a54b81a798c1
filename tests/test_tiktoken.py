"""Phi-3-small's tokenizer route: tokenizer.json built from tiktoken ranks (checkpoint/tiktoken.py).

The ranks are made here (a byte-level BPE trained on the corpus, single bytes ranked out of
byte order as cl100k's are, a few whitespace tokens), never downloaded. Ground truth is
tiktoken itself (``tiktoken.Encoding`` over the same ranks, the split pattern and the
published special tokens, ``allowed_special="all"`` as the published tokenizer encodes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import tiktoken  # the dev extra installs it (pyproject.toml); the package itself does not need it
from click.testing import CliRunner

from phi3_export.arch.phi3small import PUBLISHED_DUMMY_IDS
from phi3_export.checkpoint.tiktoken import CL100K_PATTERN, PHI3_SMALL, build_tokenizer, read_ranks
from phi3_export.cli import main
from phi3_export.errors import Phi3ExportError
from phi3_export.fixtures.corpus import corpus_text
from phi3_export.validate import tokenizer_parity

VARIED = [
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # 3.14159\n\n\nprint(mean([1, 2, 3]))\n",
    "Numbers: 1234567890, 3.5e-10, -42, 1,000,000 and 2024-05-21T12:34:56Z.",
    "She's here; they'll go, we'd've, I'M SURE IT'S FINE, don't.",
    "héllo wörld — naïve café, Ελληνικά, русский текст, 日本語のテキスト, 한국어, emoji 🤖👍🏽 and ﬁ ligatures.",
    "tabs\tand  double  spaces\r\nwindows lines\r\n\r\n  indented\n\n\n\ttabbed end\n",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|endoftext|> <|dummy_id_40|>",
]


def _ranks_from_bpe() -> dict[bytes, int]:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text("train")[:300_000].splitlines(keepends=True), trainer=trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): i for i, b in enumerate(sorted(range(256), key=lambda b: (b < 33, b)))}
    for merge in json.loads(tok.to_str())["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        ranks.setdefault(bytes(to_byte[c] for c in left + right), len(ranks))
    for extra in (b"  ", b"\n\n", b" \n", b" \n ", b"\n ", b"   ", b"\n\n\n"):  # whitespace runs cl100k has
        ranks.setdefault(extra, len(ranks))
    return ranks


def _write_ranks(ranks: dict[bytes, int], path: Path) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def _genai_folder(tokenizer_dir: Path, out: Path, vocab: int) -> Path:
    """Tokenizer files plus the smallest genai_config.json onnxruntime-genai builds a tokenizer from."""
    shutil.copytree(tokenizer_dir, out)
    decoder = {"filename": "model.onnx", "head_size": 16, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
               "num_key_value_heads": 4, "session_options": {}}
    eos = dict(PHI3_SMALL.added_ids(vocab - len(PHI3_SMALL.added)))["<|endoftext|>"]
    (out / "genai_config.json").write_text(json.dumps({
        "model": {"type": "phi3small", "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "vocab_size": vocab,
                  "context_length": 8192, "decoder": decoder},
        "search": {"max_length": 8192},
    }))
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(ranks, ranks file, built tokenizer folder) for the trained vocabulary."""
    root = tmp_path_factory.mktemp("tiktoken")
    ranks = _ranks_from_bpe()
    path = _write_ranks(ranks, root / "cl100k_base.tiktoken")
    build_tokenizer(path, PHI3_SMALL, root / "built", vocab_size=len(ranks) + 96)
    return ranks, path, root / "built"


def _encoding(ranks: dict[bytes, int], pattern: str = CL100K_PATTERN):
    return tiktoken.Encoding("phi3small-test", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=dict(PHI3_SMALL.added_ids(len(ranks))))


def test_published_special_token_ids():
    ids = dict(PHI3_SMALL.added_ids(100256))
    assert len(ids) == 96 and sorted(ids.values()) == list(range(100256, 100352))
    assert {t: ids[t] for t in ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|system|>", "<|user|>",
                                "<|assistant|>", "<|end|>", "<|endofprompt|>", "<|dummy_id_0|>", "<|dummy_id_2|>",
                                "<|dummy_id_3|>", "<|dummy_id_11|>", "<|dummy_id_12|>", "<|dummy_id_86|>")} == {
        "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
        "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263, "<|end|>": 100266, "<|endofprompt|>": 100276,
        "<|dummy_id_0|>": 100264, "<|dummy_id_2|>": 100256, "<|dummy_id_3|>": 100267, "<|dummy_id_11|>": 100275,
        "<|dummy_id_12|>": 100277, "<|dummy_id_86|>": 100351}
    # The published dummy_token_indices: the dummy tokens, the fim tokens and <|endofprompt|>.
    unused = {i for t, i in ids.items() if "dummy" in t or "fim" in t or t == "<|endofprompt|>"}
    assert unused == set(PUBLISHED_DUMMY_IDS)


def test_ids_match_tiktoken_transformers_and_genai(small, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ranks, _, built = small
    texts = [*VARIED, corpus_text("eval")[:60_000]]
    rng = random.Random(0)  # short random strings of the characters the split pattern tells apart
    alphabet = list(" \n\r\t") + list("aZé'sStTdD0123456789٣.,!?-_()[]{}\"`#") + ["日", "ё", "ß", "\u0301", "🤖", "½"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(300)]
    encoding, fast = _encoding(ranks), Tokenizer.from_file(str(built / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(built))
    genai = tokenizer_parity.artifact_tokenizer(_genai_folder(built, tmp_path / "artifact", len(ranks) + 96))
    for text in texts:
        want = encoding.encode(text, allowed_special="all")
        assert fast.encode(text).ids == want, text
        assert list(hf(text, add_special_tokens=False).input_ids) == want, text
        assert [int(i) for i in genai.encode(text)] == want, text
        assert hf.decode(want) == text
    assert len(encoding.encode(texts[-301])) > 2000


def test_chat_template_and_special_ids(small, tmp_path):
    from transformers import AutoTokenizer

    ranks, _, built = small
    ids = dict(PHI3_SMALL.added_ids(len(ranks)))
    hf = AutoTokenizer.from_pretrained(str(built))
    prompt = hf.apply_chat_template(tokenizer_parity.PARITY_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|endoftext|><|system|>\nYou are a concise assistant.<|end|>\n<|user|>\n")
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    encoded = list(hf(prompt, add_special_tokens=False).input_ids)
    assert encoded == _encoding(ranks).encode(prompt, allowed_special="all")
    assert encoded[:2] == [ids["<|endoftext|>"], ids["<|system|>"]] and encoded[-2:] == [ids["<|assistant|>"], _encoding(ranks).encode("\n")[0]]
    assert encoded.count(ids["<|user|>"]) == 2 and encoded.count(ids["<|end|>"]) == 4
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|endoftext|>",) * 3
    assert hf("hi").input_ids == hf("hi", add_special_tokens=False).input_ids  # nothing added around the text
    genai = tokenizer_parity.artifact_tokenizer(_genai_folder(built, tmp_path / "artifact", len(ranks) + 96))
    assert genai.apply_chat_template(json.dumps(tokenizer_parity.PARITY_MESSAGES), add_generation_prompt=True) == prompt
    assert tokenizer_parity.check(tmp_path / "artifact", hf, corpus_text("eval")[:5000])["passed"]


def test_cl100k_sized_ranks_give_the_published_ids(small, tmp_path):
    from tokenizers import Tokenizer

    ranks = dict(small[0])
    # Fill to cl100k's 100256 ranks with tokens no UTF-8 text holds (0xf8 never occurs in it).
    for i in range(100256 - len(ranks)):
        ranks[b"\xf8" + i.to_bytes(3, "big")] = len(ranks)
    build_tokenizer(_write_ranks(ranks, tmp_path / "cl100k_base.tiktoken"), PHI3_SMALL, tmp_path / "built", vocab_size=100352)
    fast = Tokenizer.from_file(str(tmp_path / "built" / "tokenizer.json"))
    assert fast.get_vocab_size() == 100352
    assert [fast.token_to_id(t) for t in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] == [
        100257, 100261, 100262, 100263, 100266]
    text = "<|system|>\nBe brief.<|end|>\n<|user|>\nIt's 2024: héllo!<|end|>\n<|assistant|>\n"
    assert fast.encode(text).ids == _encoding(ranks).encode(text, allowed_special="all")
    config = json.loads((tmp_path / "built" / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["100266"]["content"] == "<|end|>" and config["chat_template"] == PHI3_SMALL.chat_template


def test_newer_tiktoken_pattern_differs_only_at_trailing_whitespace(small, monkeypatch):
    # The published code takes the installed tiktoken's cl100k pattern: this one's possessive spelling.
    from tiktoken_ext import openai_public

    ranks = small[0]
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
    newer = _encoding(ranks, openai_public.cl100k_base()["pat_str"])
    for text in VARIED:
        assert newer.encode(text, allowed_special="all") == _encoding(ranks).encode(text, allowed_special="all")
    ws = {t: ranks[t] for t in (b"x", b" \n", b" ", b" \n ")}
    assert _encoding(ranks).encode("x \n ") == [ws[b"x"], ws[b" \n"], ws[b" "]]
    assert newer.encode("x \n ") == [ws[b"x"], ws[b" \n "]]


def test_output_is_deterministic(small, tmp_path):
    ranks, path, built = small
    lines = path.read_text().splitlines(keepends=True)
    random.Random(1).shuffle(lines)
    (tmp_path / "shuffled.tiktoken").write_text("".join(lines))
    build_tokenizer(tmp_path / "shuffled.tiktoken", PHI3_SMALL, tmp_path / "again", vocab_size=len(ranks) + 96)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (built / name).read_bytes()


@pytest.mark.parametrize("content, message", [
    ("", "no ranks"),
    ("IQ== 0\nIQ== 1\n", "line 2: token b'!' is also at line 1"),
    ("IQ== 0\nIg== 0\n", "line 2: rank 0 is also at line 1"),
    ("IQ== 0\n!!!! 1\n", "line 2: token '!!!!' is not base64"),
    ("IQ== zero\n", "line 1: rank 'zero' is not a non-negative integer"),
    ("IQ== -1\n", "line 1: rank '-1' is not a non-negative integer"),
    ("IQ== 0 extra\n", "line 1: expected 2 fields, got 3"),
    ("IQ== 0\nIg== 2\n", "rank 1 is missing: ranks must be 0..1"),
    ("IQ== 0\n", "byte 0x00 has no rank (255 of the 256 single bytes missing)"),
])
def test_bad_ranks_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "r.tiktoken"
    path.write_text(content)
    with pytest.raises(Phi3ExportError) as err:
        read_ranks(path)
    assert message in str(err.value) and str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_unreadable_ranks_file_and_small_vocab(small, tmp_path):
    with pytest.raises(Phi3ExportError, match=r"cannot read the tiktoken ranks file"):
        read_ranks(tmp_path)  # a folder
    ranks, path, _ = small
    with pytest.raises(Phi3ExportError, match=rf"make {len(ranks) + 96} ids, more than config.json's vocab_size 1000"):
        build_tokenizer(path, PHI3_SMALL, tmp_path / "out", vocab_size=1000)
    assert not (tmp_path / "out").exists()


# ---- the route through the CLI, on the Phi-3-small fixture ------------------------------

def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ranks_checkpoint(fixture_dir, tmp_path) -> Path:
    """The Phi-3-small fixture as published checkpoints come: no tokenizer.json, cl100k_base.tiktoken
    instead (its own vocabulary as ranks, cut to leave room for the 96 special tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = shutil.copytree(fixture_dir("phi-3-small-8k"), tmp_path / "ckpt")
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    keep = json.loads((folder / "config.json").read_text())["vocab_size"] - 96
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    _write_ranks({bytes(to_byte[c] for c in t): i for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i < keep},
                 folder / "cl100k_base.tiktoken")
    (folder / "tokenizer.json").unlink()
    return folder


def test_quantize_builds_the_tokenizer_from_the_folders_ranks(ranks_checkpoint, tmp_path):
    before = _digest(ranks_checkpoint)
    result = _run("quantize", "--checkpoint", ranks_checkpoint, "--out", tmp_path / "out", "--target", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    artifact = tmp_path / "out" / "onnx-cpu"
    spec = json.loads((artifact / "tokenizer.json").read_text())
    assert {t["content"] for t in spec["added_tokens"]} >= {"<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"}
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == CL100K_PATTERN
    assert json.loads((artifact / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (artifact / "cl100k_base.tiktoken").exists() and not (artifact / "special_tokens_map.json").exists()
    assert _digest(ranks_checkpoint) == before  # nothing written into the input folder
    # validate's reference builds the same tokenizer from the folder: onnxruntime-genai's ids are transformers'.
    result = _run("validate", tmp_path / "out", "--reference", ranks_checkpoint, "--no-speed", "--quiet",
                  "--json", tmp_path / "v.json", "--cache-dir", tmp_path / "cache")
    record = json.loads((tmp_path / "v.json").read_text())["records"][0]
    assert {c["name"]: c["passed"] for c in record["checks"]}["tokenizer_parity"] is True, result.output
    assert _digest(ranks_checkpoint) == before
    # The same tokenizer from --tiktoken-file, the ranks outside the folder: the same artifact files.
    moved = tmp_path / "ranks.tiktoken"
    shutil.move(ranks_checkpoint / "cl100k_base.tiktoken", moved)
    result = _run("quantize", "--checkpoint", ranks_checkpoint, "--out", tmp_path / "out2", "--target", "cpu", "--quiet",
                  "--tiktoken-file", moved)
    assert result.exit_code == 0, result.output
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out2" / "onnx-cpu" / name).read_bytes() == (artifact / name).read_bytes()


def _one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert all(p in lines[0] for p in parts), lines[0]


def test_tokenizer_errors_are_one_line(ranks_checkpoint, fixture_dir, tmp_path):
    out = tmp_path / "out"
    ranks = ranks_checkpoint / "cl100k_base.tiktoken"
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_text(ranks.read_text().replace(" 7\n", " seven\n", 1))
    ranks.unlink()
    _one_line_error(_run("quantize", "--checkpoint", ranks_checkpoint, "--out", out),
                    f"{ranks_checkpoint}: no tokenizer.json", "put cl100k_base.tiktoken in the folder or pass --tiktoken-file")
    _one_line_error(_run("quantize", "--checkpoint", ranks_checkpoint, "--out", out, "--tiktoken-file", corrupt),
                    str(corrupt), "rank 'seven' is not a non-negative integer")
    _one_line_error(_run("quantize", "--checkpoint", ranks_checkpoint, "--out", out, "--tiktoken-file", tmp_path / "nope"),
                    "--tiktoken-file", "not found")
    _one_line_error(_run("quantize", "--checkpoint", fixture_dir("phi-3-small-8k"), "--out", out, "--tiktoken-file", corrupt),
                    "has its own tokenizer.json")
    _one_line_error(_run("quantize", "--checkpoint", fixture_dir("phi-3-mini-4k"), "--out", out, "--tiktoken-file", corrupt),
                    "Phi3ForCausalLM checkpoints have no tiktoken tokenizer")
    assert not out.exists()
