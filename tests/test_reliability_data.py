"""Hostile data: token ids outside the vocabulary, dtypes that cannot hold it, and index caches that are
damaged, foreign, half-written by a killed process, or built by two processes at once. Each is one
clear error naming the file, or a cache rebuilt to exactly megatron-core's files."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import megatron_reference as M
from jaxpretrain.data import build_gpt_datasets
from jaxpretrain.data import vocab_check
from jaxpretrain.data.indexed import IndexedDataset, IndexedDatasetBuilder
from jaxpretrain.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(seq_length=16, split="0.9, 0.1, 0.0", seed=1234, num_samples=(300, 40, 0))


def write_pair(prefix: str, tokens, dtype=np.uint16) -> str:
    """A `.bin/.idx` pair of these tokens as documents of 25 tokens (the last one shorter)."""
    tokens = np.asarray(tokens)
    lengths = [25] * (len(tokens) // 25) + ([len(tokens) % 25] if len(tokens) % 25 else [])
    with IndexedDatasetBuilder(prefix + ".bin", dtype=dtype) as builder:
        builder.add_documents(tokens.astype(dtype), lengths)
        builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two prefixes written by megatron-core's builder, ids in [1, 1000)."""
    d = tmp_path_factory.mktemp("rel_corpus")
    prefixes = [str(d / f"corpus_{i}_text_document") for i in range(2)]
    for i, p in enumerate(prefixes):
        M.write_corpus(p, 400, seed=10 + i, mean_length=20, vocab=1000)
    return prefixes


def _one_line(e: UserError, starts: str) -> str:
    message = str(e)
    assert message.startswith(starts), message
    assert "\n" not in message
    return message


# -- ids and dtypes against the vocabulary ------------------------------------------------------------


def test_out_of_vocabulary_id_names_the_file_the_id_and_the_vocabulary(corpus, tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, 5000)
    ids[3210] = 1000  # one id just past the vocabulary, deep inside the file
    bad = write_pair(str(tmp_path / "bad_text_document"), ids)
    with pytest.raises(UserError) as info:
        build_gpt_datasets([corpus[0], bad], vocab_size=1000, cache_dir=str(tmp_path / "cache"), **KW)
    message = _one_line(info.value, bad + ".bin")
    assert "largest token id 1000" in message and "vocabulary size 1000" in message
    # Nothing was built for a run that cannot start: only the remembered ranges are in the cache.
    assert all(n.endswith("-token_range.json") for n in os.listdir(tmp_path / "cache"))
    # The boundary: ids up to vocab_size - 1 are fine, and without vocab_size nothing is checked.
    build_gpt_datasets([corpus[0], bad], vocab_size=1001, **KW)
    build_gpt_datasets([corpus[0], bad], **KW)


def test_negative_ids_in_a_signed_file(tmp_path):
    bad = write_pair(str(tmp_path / "neg_text_document"), np.r_[np.arange(1000), -3], dtype=np.int32)
    with pytest.raises(UserError) as info:
        build_gpt_datasets(bad, vocab_size=50257, **KW)
    assert "negative token id -3" in _one_line(info.value, bad + ".bin")


@pytest.mark.parametrize(
    "dtype, vocab, match",
    [
        (np.uint8, 50257, "dtype uint8 holds ids up to 255, but the model's vocabulary has 50257 tokens"),
        (np.int16, 50257, "dtype int16 holds ids up to 32767"),
        (np.float32, 50257, "dtype float32 cannot hold token ids"),
    ],
)
def test_dtype_that_cannot_hold_the_vocabulary(tmp_path, dtype, vocab, match):
    prefix = write_pair(str(tmp_path / "narrow_text_document"), np.arange(1000) % 100, dtype=dtype)
    with pytest.raises(UserError) as info:
        build_gpt_datasets(prefix, vocab_size=vocab, **KW)
    assert match in _one_line(info.value, prefix + ".idx")


def test_wider_dtypes_and_small_vocabularies_pass(tmp_path):
    for dtype, vocab in ((np.int32, 50257), (np.int64, 128256), (np.uint8, 256), (np.uint16, 50304)):
        prefix = write_pair(str(tmp_path / f"ok_{np.dtype(dtype)}_text_document"), np.arange(1000) % 200, dtype=dtype)
        assert build_gpt_datasets(prefix, vocab_size=vocab, **KW)[0] is not None


def test_token_range_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    ids = np.arange(3000) % 777
    prefix = write_pair(str(tmp_path / "r_text_document"), ids)
    cache = str(tmp_path / "cache")
    ds = IndexedDataset(prefix)
    assert vocab_check.token_range(ds, cache) == (0, 776)
    [record] = os.listdir(cache)
    assert record.endswith("-token_range.json")

    scans = []
    real_scan = vocab_check._scan
    monkeypatch.setattr(vocab_check, "_scan", lambda d: scans.append(d) or real_scan(d))
    assert vocab_check.token_range(IndexedDataset(prefix), cache) == (0, 776)
    assert scans == []  # remembered: no second pass over the file

    # Same size, new content and mtime (another tokenizer's output copied over it): scanned again.
    ids[-1] = 60000
    write_pair(prefix, ids)
    os.utime(prefix + ".bin", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert vocab_check.token_range(IndexedDataset(prefix), cache) == (0, 60000)
    assert len(scans) == 1
    # A damaged record is a miss, not an error.
    with open(os.path.join(cache, record), "w") as f:
        f.write('{"path": ')
    assert vocab_check.token_range(IndexedDataset(prefix), cache) == (0, 60000)
    assert len(scans) == 2


def test_token_range_agrees_with_a_plain_numpy_pass_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(vocab_check, "_CHUNK", 1000)  # many chunks, a ragged last one
    rng = np.random.default_rng(1)
    for dtype in (np.uint16, np.int32, np.int64):
        ids = rng.integers(-50 if dtype != np.uint16 else 0, 30000, 12345).astype(dtype)
        prefix = write_pair(str(tmp_path / f"c_{np.dtype(dtype)}"), ids, dtype=dtype)
        low, high = vocab_check.token_range(IndexedDataset(prefix))
        assert high == int(ids.max())
        assert low == (int(ids.min()) if dtype != np.uint16 else 0)
    empty = str(tmp_path / "empty")
    IndexedDatasetBuilder(empty + ".bin", dtype=np.uint16).finalize(empty + ".idx")
    assert vocab_check.token_range(IndexedDataset(empty)) is None


# -- damaged and foreign index caches: rebuilt to megatron-core's bytes --------------------------------


@pytest.fixture
def megatron_cache(corpus, tmp_path):
    """megatron-core's cache for one prefix (train + valid), and its files' bytes."""
    cache = str(tmp_path / "mega")
    M.build(([corpus[0]], None), split=KW["split"], seq_length=KW["seq_length"], seed=KW["seed"],
            sizes=list(KW["num_samples"][:2]) + [None], cache_dir=cache)
    return cache, M.list_cache(cache)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(path):
    open(path, "wb").close()


def _wrong_length(path):
    arr = np.load(path)
    np.save(path, arr[:-1])


def _foreign_description(path):
    with open(path, "w") as f:
        f.write('{"class": "GPTDataset", "random_seed": 7}')


def _not_npy(path):
    with open(path, "wb") as f:
        f.write(b"\x80\x04K\x01.")  # a pickle, not an .npy


@pytest.mark.parametrize(
    "suffix, damage, problem",
    [
        ("shuffle_index.npy", _truncate, "unreadable"),
        ("document_index.npy", _empty, "unreadable"),  # what a power loss can leave
        ("sample_index.npy", os.remove, "missing"),
        ("document_index.npy", _wrong_length, "shape"),
        ("sample_index.npy", _wrong_length, "shape"),
        ("shuffle_index.npy", _not_npy, "unreadable"),
        ("description.txt", _foreign_description, "describes another configuration"),
    ],
)
def test_damaged_cache_is_rebuilt_to_megatrons_files(corpus, megatron_cache, suffix, damage, problem, caplog):
    cache, expected = megatron_cache
    [victim] = [n for n in expected if n.endswith(f"-GPTDataset-train-{suffix}")]
    damage(os.path.join(cache, victim))
    with caplog.at_level(logging.WARNING, logger="jaxpretrain"):
        train, valid, _ = build_gpt_datasets(corpus[0], cache_dir=cache, tokenizer=M.FakeTokenizer(), **KW)
    warnings = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(warnings) == 1 and problem in warnings[0], warnings
    assert M.list_cache(cache) == expected  # byte for byte what megatron-core wrote
    ref = build_gpt_datasets(corpus[0], **KW)  # in memory
    for ours, want in zip((train, valid), ref):
        np.testing.assert_array_equal(ours.get_batch(np.arange(len(want)))["input_ids"],
                                      want.get_batch(np.arange(len(want)))["input_ids"])


def test_blend_cache_of_the_wrong_length_is_rebuilt(corpus, tmp_path, caplog):
    cache = str(tmp_path / "c")
    build_gpt_datasets(corpus, cache_dir=cache, **KW)
    files = {n: open(os.path.join(cache, n), "rb").read() for n in os.listdir(cache) if "BlendedDataset" in n}
    [victim] = [n for n in files if n.endswith("-BlendedDataset-train-dataset_index.npy")]
    _wrong_length(os.path.join(cache, victim))
    with caplog.at_level(logging.WARNING, logger="jaxpretrain"):
        build_gpt_datasets(corpus, cache_dir=cache, **KW)
    assert any("BlendedDataset-train" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert {n: open(os.path.join(cache, n), "rb").read() for n in files} == files


# -- a build killed at any moment, and two builds at once ----------------------------------------------

_KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from jaxpretrain import atomic
    from jaxpretrain.data import index_cache, build_gpt_datasets
    calls = []
    real = atomic.save_atomic
    def dying(path, write):
        calls.append(path)
        if len(calls) == {at}:
            def half(f):  # die with the temp file half written
                f.write(b"\\x93NUMPY")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
        return real(path, write)
    index_cache.save_atomic = dying
    class Tok:  # megatron_reference.FakeTokenizer's identity: the cache takes Megatron's file names
        eod, pad, vocab_size = 0, -1, 1000
        unique_identifiers = {{"class": "FakeTokenizer", "name": "fake"}}
    build_gpt_datasets({prefixes!r}, cache_dir={cache!r}, tokenizer=Tok(), **{kw!r})
    """
)


def _arrays_digest(datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        if ds is None:
            continue
        h.update(ds.get_batch(np.arange(len(ds)))["input_ids"].tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("at", [1, 4, 20])  # an array, a description (or array), inside the blends
def test_build_killed_midway_leaves_nothing_that_is_trusted(corpus, tmp_path, at):
    cache = str(tmp_path / "c")
    script = _KILLED_BUILD.format(repo=REPO, prefixes=corpus, cache=cache, kw=KW, at=at)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert any(n.startswith(".tmp-") for n in os.listdir(cache))  # it really died mid-write
    again = build_gpt_datasets(corpus, cache_dir=cache, tokenizer=M.FakeTokenizer(), **KW)
    assert _arrays_digest(again) == _arrays_digest(build_gpt_datasets(corpus, **KW))
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # the killed writer's leftovers
    # The cache after the recovery: byte for byte the files megatron-core writes for this config.
    mega = str(tmp_path / "mega")
    M.build((list(corpus), None), split=KW["split"], seq_length=KW["seq_length"], seed=KW["seed"],
            sizes=list(KW["num_samples"][:2]) + [None], cache_dir=mega, tokenizer=M.FakeTokenizer())
    assert M.list_cache(cache) == M.list_cache(mega)


_SIMULTANEOUS = textwrap.dedent(
    """
    import hashlib, sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from jaxpretrain.data import build_gpt_datasets
    while time.time() < {start}:
        time.sleep(0.001)
    out = build_gpt_datasets({prefixes!r}, cache_dir={cache!r}, vocab_size=1000, **{kw!r})
    h = hashlib.sha256()
    for ds in out:
        if ds is not None:
            h.update(ds.get_batch(np.arange(len(ds)))["input_ids"].tobytes())
    print(h.hexdigest())
    """
)


def test_two_runs_sharing_one_mapping_dir_at_once(corpus, tmp_path):
    """Two processes started at the same instant on one empty index_mapping_dir: both get complete,
    identical datasets (equal to an in-memory build), and the cache holds every file exactly once."""
    cache = str(tmp_path / "shared")
    script = _SIMULTANEOUS.format(repo=REPO, prefixes=corpus, cache=cache, kw=KW, start=time.time() + 2.5)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    digests = {out.strip() for out, _ in outs}
    assert digests == {_arrays_digest(build_gpt_datasets(corpus, **KW))}
    names = os.listdir(cache)
    assert not [n for n in names if n.startswith(".tmp-")]
    # 2 prefixes x 2 splits x 4 GPTDataset files + 2 blends x 3 files + 2 token ranges (+ lock files)
    assert len([n for n in names if not n.endswith(".lock")]) == 16 + 6 + 2
