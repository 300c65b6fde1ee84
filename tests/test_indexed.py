"""Megatron .bin/.idx: our writer is byte-identical to megatron-core's, our reader agrees with its reader,
and damaged pairs are refused with an error naming the file."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from jaxpretrain.data.indexed import (
    DTYPE_CODES,
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetBuilder,
    dtype_for_vocab,
    exists,
    get_prefix,
)
from jaxpretrain.errors import UserError

ALL_DTYPES = [DTYPE_CODES[code] for code in sorted(DTYPE_CODES)]


def _documents(dtype, rng, count=25):
    """Random documents of 0..3 sequences each, sequences of 0..40 tokens (empty ones included)."""
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    low, high = (max(info.min, -1000), min(info.max, 70000)) if info else (-1e6, 1e6)
    docs = []
    for _ in range(count):
        sequences = []
        for _ in range(rng.integers(0, 4)):
            n = int(rng.integers(0, 41))
            values = rng.integers(low, high, size=n) if info else rng.uniform(low, high, size=n)
            sequences.append(values.astype(dtype))
        docs.append(sequences)
    return docs


def _build_megatron(prefix, dtype, docs):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MegatronBuilder

    builder = MegatronBuilder(prefix + ".bin", dtype=dtype.type)
    for sequences in docs:
        for seq in sequences:
            builder.add_item(torch.from_numpy(seq.copy()))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _same_files(a, b):
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as fa, open(b + ext, "rb") as fb:
            assert fa.read() == fb.read(), f"{ext} differs for {a} vs {b}"


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_writer_is_byte_identical_and_reader_agrees(tmp_path, dtype):
    rng = np.random.default_rng(int(dtype.num))
    docs = _documents(dtype, rng)
    ref = str(tmp_path / "megatron")
    _build_megatron(ref, dtype, docs)

    # The same documents through each of our entry points.
    ours_items = str(tmp_path / "items")
    with IndexedDatasetBuilder(ours_items + ".bin", dtype=dtype) as builder:
        for sequences in docs:
            for seq in sequences:
                builder.add_item(seq)
            builder.end_document()
        builder.finalize(ours_items + ".idx")
    _same_files(ref, ours_items)

    ours_docs = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(ours_docs + ".bin", dtype=dtype)
    for sequences in docs:
        flat = np.concatenate(sequences) if sequences else np.zeros(0, dtype)
        builder.add_document(flat, [len(s) for s in sequences])
    builder.finalize(ours_docs + ".idx")
    _same_files(ref, ours_docs)

    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    theirs = MegatronDataset(ref)
    ours = IndexedDataset(ref + ".idx")  # prefix given with an extension
    assert ours.path_prefix == ref and ours.dtype == dtype
    assert len(ours) == len(theirs)
    np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    np.testing.assert_array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
    assert ours.sequence_lengths.dtype == np.int32 and ours.sequence_pointers.dtype == np.int64
    assert ours.num_documents == len(docs)
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], theirs[i])
        assert ours[i].dtype == dtype
        n = int(ours.sequence_lengths[i])
        if n >= 3:
            np.testing.assert_array_equal(ours.get(i, 1, n - 2), theirs.get(i, 1, n - 2))
            np.testing.assert_array_equal(ours.get(i, offset=2), theirs.get(i, offset=2))
    if len(ours) >= 4:
        for a, b in zip(ours[1:4], theirs[1:4]):
            np.testing.assert_array_equal(a, b)


def test_bulk_documents_equal_item_by_item(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    tokens = rng.integers(0, 50257, size=int(lengths.sum())).astype(np.int64)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    builder = IndexedDatasetBuilder(a + ".bin", dtype=np.uint16)
    for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
        builder.add_item(doc.tolist())
        builder.end_document()
    builder.finalize(a + ".idx")
    builder = IndexedDatasetBuilder(b + ".bin", dtype=np.uint16)
    half = 250
    cut = int(lengths[:half].sum())
    builder.add_documents(tokens[:cut], lengths[:half])
    builder.add_item(tokens[cut : cut + lengths[half]])
    builder.end_document()
    builder.add_documents(tokens[cut + lengths[half] :], lengths[half + 1 :])
    builder.finalize(b + ".idx")
    _same_files(a, b)


def test_add_index_concatenates(tmp_path):
    rng = np.random.default_rng(1)
    parts, whole = [], str(tmp_path / "whole")
    all_docs = []
    for p in range(3):
        docs = [[rng.integers(0, 100, size=int(rng.integers(1, 9))).astype(np.int32)] for _ in range(7)]
        all_docs += docs
        prefix = str(tmp_path / f"part{p}")
        _build_megatron(prefix, np.dtype(np.int32), docs)
        parts.append(prefix)
    _build_megatron(whole, np.dtype(np.int32), all_docs)
    merged = str(tmp_path / "merged")
    builder = IndexedDatasetBuilder(merged + ".bin")
    for prefix in parts:
        builder.add_index(prefix)
    builder.finalize(merged + ".idx")
    _same_files(whole, merged)


def test_refuses_ids_that_do_not_fit(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_documents(np.array([1, 70000]), [2])
    with pytest.raises(OverflowError):
        builder.add_item([70000])
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_writes_atomically(tmp_path):
    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_item([1, 2, 3])
    builder.end_document()
    # Until finalize nothing carries the final names.
    assert sorted(os.listdir(tmp_path)) == ["data.bin.partial"]
    assert not exists(prefix)
    builder.finalize(prefix + ".idx")
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]

    # An exception inside the block drops the partial file and leaves the old pair untouched.
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
            builder.add_item([7, 8])
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])


def test_empty_dataset(tmp_path):
    # What an input without a single usable row becomes. megatron-core writes the same bytes (its reader
    # cannot mmap the empty .bin; ours reads it as zero documents).
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16).finalize(prefix + ".idx")
    ref = str(tmp_path / "megatron")
    _build_megatron(ref, np.dtype(np.uint16), [])
    _same_files(ref, prefix)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_access_and_pickle(tmp_path):
    prefix = str(tmp_path / "d")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
        builder.add_documents(np.arange(10), [3, 7])
        builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix + ".bin")
    np.testing.assert_array_equal(ds[-1], np.arange(3, 10))
    np.testing.assert_array_equal(ds.get(1, 2, 3), [5, 6, 7])
    np.testing.assert_array_equal(ds[np.int64(0)], [0, 1, 2])
    for bad in (lambda: ds[2], lambda: ds.get(0, 2, 5), lambda: ds.get(0, -1)):
        with pytest.raises(IndexError):
            bad()
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 500  # the path travels, not the mapped arrays
    np.testing.assert_array_equal(clone[1], ds[1])
    assert ds.num_tokens == 10


def test_helpers():
    assert get_prefix("a/b_text_document.bin") == "a/b_text_document"
    assert get_prefix("a/b_text_document.idx") == "a/b_text_document"
    assert get_prefix("a/b.binx") == "a/b.binx"
    assert dtype_for_vocab(50257) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(128256) == np.int32
    assert {code: str(dt) for code, dt in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16",
    }


# -- damaged files --------------------------------------------------------------------------------------


@pytest.fixture
def good_pair(tmp_path):
    prefix = str(tmp_path / "good")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        builder.add_documents(np.arange(100), [10, 20, 30, 40])
        builder.finalize(prefix + ".idx")
    return prefix


def _rewrite(path, change):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    with open(path, "wb") as f:
        f.write(change(data))


def _expect_error(prefix, filename, match):
    with pytest.raises(UserError) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert message.startswith(filename), message
    assert match in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "ext, change, match",
    [
        (".idx", lambda d: d[:20], "truncated index"),
        (".idx", lambda d: d[: HEADER_SIZE + 8], "truncated index"),
        (".idx", lambda d: d[:-1], "truncated index"),
        (".idx", lambda d: d + b"\0" * 3, "unexpected trailing bytes"),
        (".idx", lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
        (".idx", lambda d: d[:9] + struct.pack("<Q", 2) + d[17:], "version 2"),
        (".idx", lambda d: d[:17] + bytes([42]) + d[18:], "unknown dtype code 42"),
        (".idx", lambda d: d[:-8] + struct.pack("<q", 3), "corrupt document index"),
        (".bin", lambda d: d[:-2], "truncated"),
        (".bin", lambda d: d + b"\0\0", "larger than its index says"),
    ],
)
def test_rejects_damaged_files(good_pair, ext, change, match):
    _rewrite(good_pair + ext, change)
    _expect_error(good_pair, good_pair + ext, match)


def test_rejects_foreign_file(tmp_path):
    prefix = str(tmp_path / "foreign")
    with open(prefix + ".idx", "w") as f:
        f.write('{"this": "is json"}\n')
    open(prefix + ".bin", "wb").close()
    _expect_error(prefix, prefix + ".idx", "bad magic")


def test_missing_files(good_pair):
    os.remove(good_pair + ".bin")
    _expect_error(good_pair, good_pair + ".bin", "data file not found")
    os.remove(good_pair + ".idx")
    _expect_error(good_pair, good_pair + ".idx", "index file not found")


def test_a_directory_where_a_file_belongs(good_pair):
    os.remove(good_pair + ".bin")
    os.mkdir(good_pair + ".bin")
    _expect_error(good_pair, good_pair + ".bin", "is a directory, not a Megatron data file")
