"""The embedded GPT-2 tokenizer works offline, and the tiktoken encoder gives HF's ids exactly."""

from __future__ import annotations

import json
import os
import random

import pytest
from conftest import word_level_tokenizer

from jaxpretrain.errors import UserError
from jaxpretrain.tokenizer import (
    GPT2FastEncoder,
    fast_encoder_for,
    gpt2_tokenizer_dir,
    load_tokenizer,
    save_tokenizer,
)


@pytest.fixture(scope="module")
def fast():
    return GPT2FastEncoder()


def _assert_same(tokenizer, fast, texts):
    expected = tokenizer(list(texts)).input_ids  # a batch call: same ids as one call per text, in Rust threads
    for text, ids in zip(texts, expected):
        got = fast.encode(text)
        assert got == ids, f"differs on {text[:80]!r}"
        assert fast.encode_to_numpy(text).tolist() == ids


def test_embedded_gpt2_offline(gpt2_tokenizer):
    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.eos_token_id == 50256
    assert gpt2_tokenizer.model_max_length == 1024
    assert gpt2_tokenizer("Hello world").input_ids == [15496, 995]
    for name in ("gpt2", "openai-community/gpt2"):
        assert load_tokenizer(name)("Hello world").input_ids == [15496, 995]


def test_fast_equals_hf_on_stdlib_sources(gpt2_tokenizer, fast, stdlib_jsonl):
    texts = [json.loads(line)["text"] for path in stdlib_jsonl for line in open(path, encoding="utf-8")]
    _assert_same(gpt2_tokenizer, fast, texts)


WHITESPACE = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2000", "\u2007", "\u200a",
              "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b", "\ufeff", "\u180e"]


def test_fast_equals_hf_on_hard_cases(gpt2_tokenizer, fast):
    texts = [
        "", " ", "  ", "\n", "\n\n\n", "   x", "x   ", "x   \n", "\t\tdef f():\n\t\treturn 1\n\n\n",
        "a<|endoftext|>b", "<|endoftext|>", " <|endoftext|> ", "<|endoftext|><|endoftext|>",
        "x\n<|endoftext|>\ny", "<|endoftext|", "<|endof text|>", "<|ENDOFTEXT|>", "<<|endoftext|>>",
        "héllo wörld naïve café", "日本語のテキスト、中文文本。", "Ελληνικά Русский العربية עברית हिन्दी",
        "emoji 🌍🚀 👩‍👩‍👧‍👦 👍🏽 🇫🇷🇯🇵 ❤️ 1️⃣", "combining e\u0301 a\u0308\u0308 Z\u0335\u0321",
        "don't I'll we've they're she's I'd I'm DON'T 'tis", "1234567890 3.14159 1e-10 0x1F ٣٤٥ ①②",
        "\ufffd invalid replacement", "tab\there", "mixed \u00a0nbsp\u3000ideographic \u2028line",
        "a" * 100_000, " " * 10_000 + "x", "\n" * 5_000, "9" * 50_000, "🌍" * 5_000,
        ("word " * 20_000) + "end", "x" + "\t \n" * 3_000,
    ]
    # Every pair of whitespace characters, in runs before letters, digits, punctuation and the end.
    for a in WHITESPACE:
        for b in WHITESPACE:
            texts.append(f"x{a}{b}y{a}{a}{b}1{b}{a}.{a}{b}")
    _assert_same(gpt2_tokenizer, fast, texts)


def test_fast_equals_hf_on_random_strings(gpt2_tokenizer, fast):
    rng = random.Random(0)
    alphabet = WHITESPACE + list("aZ09'.,-_(){}<>|!?\"\\/#") + ["é", "ß", "日", "🌍", "\u0301", "٣", "Ω",
                                                                  "<|endoftext|>", "'s", "'ll", "\u200d"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    _assert_same(gpt2_tokenizer, fast, texts)


def test_fast_equals_hf_on_unicode_sample(gpt2_tokenizer, fast):
    # All of the BMP below CJK, then a stride through the rest: letters, numbers, marks and spaces of every
    # script meet each character class of GPT-2's pre-tokenizer regex. The exhaustive version runs with
    # JAXPRETRAIN_EXHAUSTIVE=1 (about two minutes).
    exhaustive = os.environ.get("JAXPRETRAIN_EXHAUSTIVE") == "1"
    codepoints = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    if not exhaustive:
        codepoints = [c for c in codepoints if c < 0x3400 or c % 97 == 0]
    texts = []
    for start in range(0, len(codepoints), 1000):
        chars = [chr(c) for c in codepoints[start : start + 1000]]
        texts.append("".join(f"x{c}y {c}{c} 1{c}2\n{c}  {c}a" for c in chars))
    _assert_same(gpt2_tokenizer, fast, texts)


def test_fast_path_detection(gpt2_tokenizer, tmp_path):
    assert fast_encoder_for(gpt2_tokenizer) is not None
    # A local directory holding GPT-2 (as a user's copy of openai-community/gpt2 would) qualifies too.
    assert fast_encoder_for(load_tokenizer(gpt2_tokenizer_dir())) is not None
    assert fast_encoder_for(word_level_tokenizer()) is None


def test_save_tokenizer_round_trips(gpt2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "export"
    written = save_tokenizer(None, str(out))
    names = {os.path.basename(p) for p in written}
    assert {"tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    reloaded = AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x  <|endoftext|> 🌍"
    assert reloaded(text).input_ids == gpt2_tokenizer(text).input_ids
    assert reloaded.eos_token_id == 50256
    # A loaded tokenizer object works too.
    assert save_tokenizer(gpt2_tokenizer, str(tmp_path / "again"))


def test_unknown_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer-dir"))


def test_cache_dir_is_rebuilt_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPRETRAIN_CACHE", str(tmp_path / "cache"))
    first = gpt2_tokenizer_dir()
    assert first.startswith(str(tmp_path))
    assert gpt2_tokenizer_dir() == first
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first)]  # no staging dirs left over
