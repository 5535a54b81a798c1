"""Fixture tokenizers have the published structure per kind, and the artifact's tokenizer
(onnxruntime-genai, i.e. onnxruntime-extensions) gives the reference's (transformers) ids on
text built to be hard, on chat prompts and on English prose the fixture never saw."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from phi3_export.checkpoint import Checkpoint
from phi3_export.export.tokenizer_files import copy_tokenizer_files
from phi3_export.fixtures.tokenizer import PHI3_CHAT_TEMPLATE, PHI4_MINI_CHAT_TEMPLATE, SPIECE
from phi3_export.validate import tokenizer_parity

RECIPES = {"llama-sentencepiece": "phi-3-mini-4k", "byte-bpe": "phi-4-mini"}

# Plain licence-style English with indented headings (the shape of the eval text),
# written for this test: nothing in the fixture's training corpus.
ENGLISH = """\
SOFTWARE DISTRIBUTION TERMS

  1. Definitions
     "Work" means the program and every file distributed with it.
     "Recipient" means anyone who receives a copy of the Work.

  2. Permission
     Copyright holders grant each Recipient a perpetual, worldwide, royalty-free
     permission to copy, modify and share the Work, provided that this notice is
     kept in all copies or substantial portions.

        (a) Attribution must remain visible.
        (b) Modified files must say that they were changed, and when.

  3. No Warranty
 THE WORK IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.
\tIn no event shall the authors be liable for any claim, damages or other liability.

Questions?  Write to the maintainers; answers usually arrive within 2-3 weeks.
"""


def hard_text(added_tokens: list[str]) -> str:
    """Whitespace, digits, punctuation runs, scripts, emoji, code, then text right after each added token."""
    lines = [
        " leading space", "  two leading spaces", "\tleading tab", "    four-space indent", "        eight", "\t\tdouble tab",
        "", "", "   ", "\t", "trailing spaces   ", "trailing tab\t", "inner  double   triple    quad     spaces",
        "tabs\tin\t\tthe\tmiddle", "mixed \t \t whitespace",
        "0 1 12 123 1234 12345 1234567890 3.14159 1,000,000 2024-06-01 12:30:45 0x1F 1e-5 -42 +7 50% $19.99 #1",
        "Wait... what?!?! -- yes --- no ((())) [[x]] {{y}} <<z>> '' \"\" ``` ~~~ @#$%^&* -> => :: // /* */ ;; ,,",
        "\"Quoted,\" she said; 'single' (paren) [bracket] {brace} <angle> a/b a\\b a|b a_b a-b a+b a=b",
        "中文文本测试，标点。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
        "emoji 😀 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧 🤖🚀 ✅ ✨",
        "héllo wörld naïve café façade Ωmega ≠ ≤ ∑ ∫ π² x³ ½ № ™ © ®",
        "Cyrillic Привет мир, Greek Καλημέρα, Arabic مرحبا, Hebrew שלום, Hindi नमस्ते, Thai สวัสดี",
        "def f(x):", "    return x ** 2  # comment", "", "if __name__ == '__main__':", "\tprint(f(3), end='')",
        "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
        "$ ls -la | grep '\\.py$' && echo \"done\" > /dev/null 2>&1",
        "https://example.com/path?query=1&b=2#frag user@example.org",
        "CamelCaseWord snake_case_word kebab-case-word UPPER_CASE it's don't we're I'm you'll IT'S",
        "a\r\nwindows line", "non\u00a0breaking space", "zero\u200bwidth", "e\u0301 combining", "<|user", "|>", "< |end| >",
    ]
    text = "\n".join(lines) + "\n"
    for token in added_tokens:
        for after in ["Hello", " Hello", "  Hello", "\nHello", "\n\nHello", "\n  indented", "\tx", " \n", "123", "😀", "中文", "!?", ""]:
            text += token + after
    return text


def _tokenizer_json(folder: Path) -> dict:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def _artifact(checkpoint: Path, out: Path) -> Path:
    """The tokenizer part of an ONNX artifact: the files the exporter copies, and a genai_config.json."""
    out.mkdir()
    copy_tokenizer_files(Checkpoint(checkpoint), out)
    config = json.loads((checkpoint / "config.json").read_text())
    decoder = {"filename": "model.onnx", "head_size": 16, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
               "num_key_value_heads": 4, "session_options": {}}
    (out / "genai_config.json").write_text(json.dumps({
        "model": {"type": "phi3", "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"], "vocab_size": config["vocab_size"], "context_length": 4096,
                  "decoder": decoder},
        "search": {"max_length": 4096},
    }))
    return out


@pytest.fixture(params=sorted(RECIPES))
def kind(request):
    return request.param


@pytest.fixture
def pair(kind, fixture_dir, tmp_path):
    """(reference transformers tokenizer, artifact folder, fixture folder) for one tokenizer kind."""
    folder = fixture_dir(RECIPES[kind])
    return tokenizer_parity.reference_tokenizer(folder), _artifact(folder, tmp_path / "artifact"), folder


def test_llama_fixture_has_phi3_mini_structure(fixture_dir):
    folder = fixture_dir("phi-3-mini-4k")
    spec = _tokenizer_json(folder)
    assert spec["normalizer"] == {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPIECE}, {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}]}
    assert spec["pre_tokenizer"] is None
    assert spec["decoder"] == {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPIECE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    assert spec["post_processor"]["type"] == "TemplateProcessing" and spec["post_processor"]["special_tokens"] == {}
    model = spec["model"]
    assert (model["type"], model["unk_token"], model["fuse_unk"], model["byte_fallback"]) == ("BPE", "<unk>", True, True)
    vocab = model["vocab"]
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258] and len(vocab) == 1000
    added = [(t["id"], t["content"], t["special"], t["rstrip"]) for t in spec["added_tokens"]]
    chat = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>",
            "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
    assert added == [(0, "<unk>", True, False), (1, "<s>", True, False), (2, "</s>", False, True)] + [
        (1000 + i, t, True, t != "<|endoftext|>") for i, t in enumerate(chat)]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["legacy"], config["add_bos_token"]) == ("LlamaTokenizer", False, False)
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "<|endoftext|>", "<|endoftext|>")
    assert config["chat_template"] == PHI3_CHAT_TEMPLATE
    assert config["added_tokens_decoder"]["1007"]["content"] == "<|end|>"
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 1000


def test_byte_bpe_fixture_has_phi4_mini_structure(fixture_dir):
    folder = fixture_dir("phi-4-mini")
    spec = _tokenizer_json(folder)
    assert spec["normalizer"] is None
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and r"\p{N}{1,3}" in split["pattern"]["Regex"]
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert spec["decoder"]["type"] == spec["post_processor"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE" and not spec["model"]["byte_fallback"] and len(spec["model"]["vocab"]) == 1000
    added = {t["content"]: (t["id"], t["special"], t["rstrip"]) for t in spec["added_tokens"]}
    assert added["<|endoftext|>"] == (1000, True, False) and added["<|endofprompt|>"] == (1001, True, False)
    assert [added[t] for t in ("<|assistant|>", "<|end|>", "<|user|>", "<|system|>")] == [
        (1002, True, True), (1003, True, True), (1004, True, True), (1005, True, True)]
    assert added["<|tool|>"] == (1006, False, True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["add_prefix_space"]) == ("GPT2Tokenizer", False)
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == "<|endoftext|>"
    assert config["chat_template"] == PHI4_MINI_CHAT_TEMPLATE


def test_parity_on_hard_text(pair):
    ref, artifact, _ = pair
    added = [t["content"] for t in _tokenizer_json(artifact)["added_tokens"]]
    text = hard_text(added)
    result = tokenizer_parity.check(artifact, ref, text)
    assert result["passed"], result["detail"]
    assert result["chat_template_equal"] and result["chat_ids_equal"]
    # line by line too: every line starts a text of its own (the dummy prefix, a leading space)
    ours = tokenizer_parity.artifact_tokenizer(artifact)
    lines = text.split("\n")
    differ = [s for s in lines if [int(t) for t in ours.encode(s)] != ref(s, add_special_tokens=False).input_ids]
    assert differ == [], f"{len(differ)} of {len(lines)} lines differ, first {differ[0]!r}"


def test_parity_on_chat_prompts(pair):
    ref, artifact, _ = pair
    ours = tokenizer_parity.artifact_tokenizer(artifact)
    contents = [" leading space", "\nleading newline", "  two\n\n  indented\n", "\tx", "123 ...", "😀 中文", "", "trailing  "]
    for content in contents:
        messages = [{"role": "system", "content": content}, {"role": "user", "content": content},
                    {"role": "assistant", "content": content}, {"role": "user", "content": "next" + content}]
        for generation in (True, False):
            prompt = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert ours.apply_chat_template(json.dumps(messages), add_generation_prompt=generation) == prompt
            assert [int(t) for t in ours.encode(prompt)] == ref(prompt, add_special_tokens=False).input_ids, repr(prompt)


def test_parity_on_english_it_never_saw(pair):
    ref, artifact, _ = pair
    texts = [ENGLISH, "  " + ENGLISH]  # the second starts indented, as the eval text did
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"  # Python's own licence, where installed
    if license_file.is_file():
        texts.append(license_file.read_text(encoding="utf-8"))
    for text in texts:
        result = tokenizer_parity.check(artifact, ref, text)
        assert result["passed"], result["detail"]


def test_parity_failure_names_line_token_and_context(fixture_dir, tmp_path):
    # The reference: the same vocabulary behind a Metaspace pre-tokenizer with
    # prepend_scheme "first" (" Copyright" -> ▁Copyright) instead of Phi-3's dummy prefix.
    folder = fixture_dir("phi-3-mini-4k")
    artifact = _artifact(folder, tmp_path / "artifact")
    reference = tmp_path / "reference"
    reference.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(folder / name, reference / name)
    spec = _tokenizer_json(reference)
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPIECE, "prepend_scheme": "first", "split": False}
    (reference / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    ref = tokenizer_parity.reference_tokenizer(reference)

    text = "Plain first line\nSecond line of the text\n Copyright notice, indented\n"
    assert tokenizer_parity.check(artifact, ref, text)["ids_equal"]  # a leading space inside the text: no difference
    result = tokenizer_parity.check(artifact, ref, " Copyright notice\n" + text)
    assert not result["passed"] and not result["ids_equal"] and result["first_mismatch"] == 0
    where = result["mismatch"]
    assert (where["line"], where["token"], where["line_text"]) == (1, 1, " Copyright notice")
    assert where["artifact"][:2] == [SPIECE, SPIECE + "C"] and where["reference"][0] == SPIECE + "C"
    assert result["lines_differ"] == 2 and result["lines"] == 5  # the two lines that start with a space
    assert result["detail"].startswith("ids differ at line 1, token 1: artifact ['▁', '▁C'")
    assert "(2 of 5 lines tokenize differently)" in result["detail"]
    # after a chat token the reference drops the dummy prefix: caught on the rendered prompt
    assert result["chat_template_equal"] and not result["chat_ids_equal"]
    assert result["chat_mismatch"]["token"] == 2 and result["chat_mismatch"]["artifact"][:2] == ["<|system|>", SPIECE]

    later = tokenizer_parity.check(artifact, ref, "one\ntwo\n\n" + "word " * 40 + "\n<|user|> x")
    assert later["mismatch"]["line"] == 5 and later["mismatch"]["token"] == 2
    assert later["mismatch"]["artifact"][0] == ".." and "ids differ at line 5, token 2" in later["detail"]


def test_exported_artifact_passes_on_english_it_never_saw(exported, fixture_dir):
    # What `validate` runs: the exported folder's genai_config + tokenizer files vs the checkpoint's.
    artifact = exported("phi-3-mini-4k", bits=4, targets=("cpu",)) / "onnx-cpu"
    ref = tokenizer_parity.reference_tokenizer(fixture_dir("phi-3-mini-4k"))
    result = tokenizer_parity.check(artifact, ref, "  " + ENGLISH)
    assert result["passed"], result["detail"]
    assert result["detail"] == tokenizer_parity.PASSED and result["reference_tokens"] > 100
