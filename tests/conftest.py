"""Shared fixtures: a small real corpus, the offline GPT-2 tokenizer, and megatron-core as the reference."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Never reach for the Hugging Face hub from tests (there is no network, and a hang would cost minutes).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# On a GPU machine the suite's 2 workers and the processes they start share the card: each takes
# what it needs instead of JAX's default 75% of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One JAX compilation cache for the session, inherited by every process a test starts: dozens of
# train CLI runs compile the same tiny programs, and a cache hit returns the same executable, so
# results are unchanged (bit-identical resume tests included). Removed when the session ends. Every
# program is cached, however quick to compile: a tiny train run's dozen small ones (init, norms,
# validation) cost 1.3 s more to compile than to read (8.3-8.7 s vs 9.6-10.9 s per cached run).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="jaxpretrain-tests-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# ... shared by the processes of a multi-process CPU run too: tests/site/sitecustomize.py, imported at
# start-up by every process started from here, makes JAX's cache keys the same in all of them.
_SITE = os.path.join(REPO_ROOT, "tests", "site")
if _SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)


# ------------------------------------------------------------------ order and grouping for pytest-xdist
# The suite runs on 2 workers (pyproject's addopts: `-n 2 --dist loadgroup --no-loadscope-reorder`).
# A worker takes one unit at a time, in the order below, so a module's module-scoped fixtures run
# once. The tests that start several processes share one unit: two of them side by side (four
# processes and a SLURM on 2 cores) slowed the suite as a whole. Units go slowest first (figures:
# `--durations=0` on this 2-core VM, 2026-12-02), so the small ones fill in at the end.
MULTI_PROCESS = ("test_slurm", "test_multihost", "test_multiprocess_train", "test_parallel")
SLOWEST_FIRST = (  # seconds on 2 workers: 402, 313, 134, 78, 76, 65, 64, 56, 44, 42, 36, 36
    "multi_process", "test_reliability_train", "test_train", "test_llama_vs_torch", "test_model_vs_torch",
    "test_hellaswag", "test_cli_errors", "test_scan", "test_train_vs_torch", "test_llama_train",
    "test_generate", "test_sharding",
)


def xdist_unit(item) -> str:
    module = item.module.__name__.rpartition(".")[2] if getattr(item, "module", None) else item.nodeid
    return "multi_process" if module in MULTI_PROCESS else module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_unit(item), len(rank)))  # stable: modules stay in order
    if config.pluginmanager.hasplugin("xdist"):  # the mark is xdist's: unknown (a warning) without it
        for item in items:
            item.add_marker(pytest.mark.xdist_group(xdist_unit(item)))


def run_module(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m module args...` with this checkout importable; text output captured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT
    )


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The embedded GPT-2 BPE as a Hugging Face tokenizer (offline)."""
    from jaxpretrain.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def stdlib_jsonl(tmp_path_factory) -> list[str]:
    """A few hundred CPython stdlib sources as FineWeb-style JSONL, in 3 chunk files."""
    from jaxpretrain.data.stdlib_corpus import write_stdlib_jsonl

    return write_stdlib_jsonl(str(tmp_path_factory.mktemp("stdlib_jsonl")), num_files=3, max_docs=300)


def megatron_reference(input_files, out_dir, tokenizer, *, key="text", append_eod=True, prefix="reference"):
    """Automodel's loop, reduced: megatron-core's IndexedDatasetBuilder fed `tokenizer(text).input_ids` (+ eos).

    Returns one prefix per input file. Rows the preprocessor skips (no usable text) are skipped here too.
    """
    import torch  # noqa: F401  (megatron-core needs it importable)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefixes = []
    for i, path in enumerate(input_files):
        out = os.path.join(out_dir, f"{prefix}_{i}_{key}_document")
        builder = IndexedDatasetBuilder(out + ".bin", dtype=DType.optimal_dtype(len(tokenizer)))
        for text in iter_texts(path, key):
            ids = tokenizer(text).input_ids
            if append_eod:
                ids = ids + [tokenizer.eos_token_id]
            builder.add_document(ids, [len(ids)])
        builder.finalize(out + ".idx")
        prefixes.append(out)
    return prefixes


def iter_texts(path, key="text"):
    """The usable texts of a JSONL or parquet file, in order (valid rows with a non-empty string)."""
    import json

    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for text in pq.read_table(path, columns=[key]).column(key).to_pylist():
            if isinstance(text, str) and text:
                yield text
        return
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
                text = row[key]
                text.encode("utf-8")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if isinstance(text, str) and text:
                yield text


@pytest.fixture(scope="session")
def stdlib_reference(stdlib_jsonl, gpt2_tokenizer, tmp_path_factory) -> list[str]:
    """megatron-core's files for `stdlib_jsonl` with HF GPT-2 ids + eos, one prefix per chunk."""
    return megatron_reference(stdlib_jsonl, str(tmp_path_factory.mktemp("reference")), gpt2_tokenizer)


@pytest.fixture(scope="session")
def training_jsonl(tmp_path_factory) -> list[str]:
    """The training tests' text: 300 CPython stdlib sources in 2 JSONL files."""
    from jaxpretrain.data.stdlib_corpus import write_stdlib_jsonl

    return write_stdlib_jsonl(str(tmp_path_factory.mktemp("training_jsonl")), num_files=2, max_docs=300)


def preprocess_jsonl(paths: list[str], out_dir: str, *flags: str) -> str:
    """`paths` through our preprocess CLI (eos appended, `flags` added) into `out_dir`; the files' glob."""
    r = run_module(
        "jaxpretrain.preprocess", "--input", *paths, "--json-keys", "text", "--output-prefix", "processed_data",
        "--output-path", out_dir, "--workers", "2", "--append-eod", *flags,
    )
    assert r.returncode == 0, r.stderr
    return os.path.join(out_dir, "processed_data_*_text_document*")


@pytest.fixture(scope="session")
def token_glob(training_jsonl, tmp_path_factory):
    """`training_jsonl` in GPT-2's tokens (the embedded BPE), as Megatron files; one for the session
    (each run keeps its own index cache)."""
    return preprocess_jsonl(training_jsonl, str(tmp_path_factory.mktemp("corpus") / "tok"))


SMALL_VOCAB = 512  # ln(512) = 6.24: the loss of a fresh model on the small corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Megatron token files and the HF tokenizer (a directory) that wrote them."""

    glob: str
    tokenizer: str
    vocab_size: int

    def overrides(self) -> dict:
        """Train CLI fields that point a run at these files, with a model vocabulary to match."""
        return {
            "dataset.paths": self.glob, "validation_dataset.paths": self.glob,
            "dataset.tokenizer": self.tokenizer, "model.vocab_size": self.vocab_size,
        }


@pytest.fixture(scope="session")
def corpus(training_jsonl, tmp_path_factory) -> Corpus:
    """`training_jsonl` tokenized by our preprocess CLI with a byte-level BPE of 512 tokens trained on it
    here (deterministic, offline). Training tests that need no GPT-2 text use it: with GPT-2's 50,257
    tokens the embedding and head are 97% of a tiny model, so every step, every validation pass and
    every checkpoint write of those tests cost several times more (a cached 30-step train run on this
    VM: 12.9-13.7 s of CPU with GPT-2's vocabulary, 6.8-8.2 s with this one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("small_corpus")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pre-tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SMALL_VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((text for path in training_jsonl for text in iter_texts(path)), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert len(tokenizer) == SMALL_VOCAB
    tokenizer_dir = str(root / "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    glob = preprocess_jsonl(training_jsonl, str(root / "tok"), "--pretrained-model-name-or-path", tokenizer_dir)
    return Corpus(glob, tokenizer_dir, SMALL_VOCAB)


def word_level_tokenizer(vocab_size=100):
    """A non-GPT-2 HF tokenizer built offline: whitespace-separated words `w0`, `w1`, ... and `</s>` as eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1}
    for i in range(vocab_size - 2):
        vocab[f"w{i}"] = i + 2
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
