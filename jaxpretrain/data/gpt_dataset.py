"""Megatron-Core's `GPTDataset`, index for index: split ranges, the document / sample / shuffle indices,
and sample reads.

Everything here reproduces `megatron/core/datasets/gpt_dataset.py` (megatron-core 0.16) with
`add_extra_token_to_sequence=True`, the Automodel setting:

- A split is a range of sequences `[round(lo * N), round(hi * N))` of one `.bin/.idx` pair.
- `num_epochs` is the smallest E with `E * tokens_per_epoch >= num_samples * seq_length + 1`.
- document_index: the split's sequences tiled E times (int32) and shuffled with one
  `numpy.random.RandomState(seed)`; with a *separate final epoch* (E > 1 and the last epoch
  contributes fewer than `int(0.8 * samples_per_epoch)` samples) the first E-1 epochs and the last one
  are shuffled separately.
- sample_index `[n + 1, 2]`: sample s starts at token `s * seq_length` of the concatenated documents and
  spans `seq_length + 1` tokens; the row holds (position in document_index, token offset). Megatron's
  C++ loop walks document by document; here the same rows come from a cumulative sum of the document
  lengths (`_sample_index`), with no compiled helper.
- shuffle_index: `arange(n)` shuffled by the same RandomState after the document index (uint32 unless
  huge), in two ranges with a separate final epoch.
- The cache (`data/index_cache.py`): `{md5}-GPTDataset-{split}-{description.txt, document_index.npy,
  sample_index.npy, shuffle_index.npy}`, md5 of Megatron's JSON description, so a changed input or
  config never hits a stale cache, and Megatron and we can share a cache directory.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Sequence

import numpy as np

from jaxpretrain.data import index_cache
from jaxpretrain.data.indexed import IndexedDataset
from jaxpretrain.errors import UserError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")

# Megatron's threshold for shuffling the last epoch on its own (gpt_dataset.py).
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


# -- split strings ----------------------------------------------------------------------------------


def normalize(weights) -> list[float]:
    """Megatron's `normalize`: float64 division by the float64 sum, back to Python floats."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def parse_split(split) -> list[float]:
    """`"969, 30, 1"` or `"0.99, 0.01, 0.00"` (or a list of numbers) -> three normalized fractions."""
    text = split if isinstance(split, str) else ", ".join(str(s) for s in split)
    numbers = [float(x) for x in re.findall(r"[.0-9]+", text)]
    if not numbers or len(numbers) > len(SPLIT_NAMES):
        raise UserError(f"split: {text!r} must be one to three numbers, e.g. '969, 30, 1'")
    numbers += [0.0] * (len(SPLIT_NAMES) - len(numbers))
    if sum(numbers) <= 0:
        raise UserError(f"split: {text!r} has no positive part")
    return normalize(numbers)


def split_matrix(vector: Sequence[float]) -> list[tuple[float, float] | None]:
    """Cumulative bounds per split, None for an empty one (`convert_split_vector_to_split_matrix`).

    The running sums start from the int 0 exactly as Megatron's reduce does; the floats (and so the
    JSON description and its md5) come out bit-identical.
    """
    bounds = functools.reduce(lambda a, b: a + [a[len(a) - 1] + b], [[0], *vector])
    return [None if hi <= lo else (lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_text(split) -> str:
    """The split as Megatron's config stores it (Automodel joins a list with ', ')."""
    return split if isinstance(split, str) else ", ".join(str(s) for s in split)


# -- index construction -----------------------------------------------------------------------------


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def _shuffled(values: np.ndarray, rng: np.random.RandomState, dtype) -> np.ndarray:
    """`rng.shuffle` of `values` as `dtype`. The swaps it draws depend only on the length, and its
    8-byte-item path is about 25% faster, so shuffle int64 and narrow afterwards: same result."""
    wide = np.asarray(values, dtype=np.int64)
    rng.shuffle(wide)
    return wide.astype(dtype, copy=False)


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """`_build_document_index`: the documents tiled per epoch (int32), shuffled."""
    if not separate_final_epoch or num_epochs == 1:
        return _shuffled(np.tile(np.asarray(documents, dtype=np.int64), num_epochs), rng, np.int32)
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """`_build_shuffle_index`: arange(num_samples) shuffled, then [num_samples, total) shuffled apart."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = _shuffled(np.arange(num_samples, dtype=np.int64), rng, dtype)
    if num_samples == total_size:
        return first
    last = _shuffled(np.arange(num_samples, total_size, dtype=np.int64), rng, dtype)
    return np.concatenate((first, last))


def build_sample_index(
    sizes: np.ndarray,
    document_index: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
) -> np.ndarray:
    """The rows of Megatron's `build_sample_idx` (helpers.cpp), without its loop.

    Sample s starts at global token p = s * seq_length of the documents in document_index order. Its
    row is (j, p - C[j]) for the document j holding token p, C the running sum of the lengths; the last
    `j` with C[j] <= p, so zero-length documents are stepped over as the C++ loop does. Instead of a
    binary search per sample, count the sample starts in each document
    (ceil(C[j+1] / seq) - ceil(C[j] / seq)) and repeat each document that many times.
    """
    total_tokens = num_epochs * tokens_per_epoch
    if drop_last_partial_sequence:
        num_samples = (total_tokens - 1) // seq_length
    else:
        # the C++ computes this in float32
        num_samples = int(np.ceil(np.float32(total_tokens - 1) / np.float32(seq_length)))
    top = max(len(document_index), int(sizes.max()) if len(sizes) else 0)
    dtype = np.int32 if top <= np.iinfo(np.int32).max else np.int64

    if len(document_index) * 2 > len(sizes):
        sizes = np.array(sizes)  # dense access: read the (mmap'd) lengths once, sequentially
    lengths = sizes[document_index]
    bounds = np.empty(len(lengths) + 1, dtype=np.int64)
    bounds[0] = 0
    np.cumsum(lengths, dtype=np.int64, out=bounds[1:])
    # first sample starting at or after each document boundary: ceil(bound / seq_length)
    firsts = bounds + (seq_length - 1)
    firsts //= seq_length
    per_doc = np.diff(firsts)
    positions = np.arange(len(lengths), dtype=np.int32 if len(lengths) < 2**31 else np.int64)
    docs = np.repeat(positions, per_doc)[: num_samples + 1]
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    filled = len(docs)
    out[:filled, 0] = docs
    out[:filled, 1] = np.arange(filled, dtype=np.int64) * seq_length - bounds[docs]
    out[0] = 0  # the C++ starts at (0, 0) even when the first document is empty
    if filled < num_samples + 1:
        # only without drop_last: the last row points at the last token (C++: `sizes[last] - 1`)
        out[filled:, 0] = len(document_index) - 1
        out[filled:, 1] = int(sizes[document_index[-1]]) - 1
    return out


# -- the dataset ------------------------------------------------------------------------------------


class IndexConfig:
    """The config fields that enter Megatron's description (and so the cache names)."""

    def __init__(self, *, seed: int, seq_length: int, split: str | None, matrix, tokenizer, cache_dir: str | None):
        self.seed = int(seed)
        self.seq_length = int(seq_length)
        self.split = split
        self.split_matrix = matrix
        self.tokenizer = tokenizer
        self.cache_dir = cache_dir

    def identifiers(self) -> dict:
        return {
            "random_seed": self.seed,
            "sequence_length": self.seq_length,
            "split": self.split,
            "split_matrix": self.split_matrix,
            "tokenizer": self.tokenizer,
        }


class GPTDataset:
    """One split of one `.bin/.idx` pair: `len()`, `ds[i]`, `ds.get_batch(indices)`.

    Sample i is sample i of megatron-core's GPTDataset for the same inputs: `input_ids = text[:-1]`,
    `labels = text[1:]` of the `seq_length + 1` tokens at `shuffle_index[i]`, as int32.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        dataset_path: str,
        documents: range,
        num_samples: int | None,
        split: str,
        config: IndexConfig,
    ):
        """Plans the dataset (identity, size, checks); `build()` makes or loads the index arrays."""
        self.indexed = indexed
        self.dataset_path = dataset_path
        self.documents = documents
        self.num_samples = num_samples
        self.split = split
        self.config = config
        self.seq_length = config.seq_length
        self.unique_identifiers = {
            "class": "GPTDataset",
            "dataset_path": dataset_path,
            "num_samples": num_samples,
            "index_split": split,
            **config.identifiers(),
        }
        self.unique_description = index_cache.describe(self.unique_identifiers)
        self.unique_description_hash = index_cache.description_hash(self.unique_description)
        self.cache_base = f"{self.unique_description_hash}-GPTDataset-{split}"

        sizes = indexed.sequence_lengths
        self.tokens_per_epoch = int(np.sum(sizes[documents.start:documents.stop], dtype=np.int64))
        if len(documents) == 0:
            raise UserError(
                f"{dataset_path}: split {config.split!r} leaves the {split} split of its {len(indexed)} documents empty"
            )
        if self.tokens_per_epoch < self.seq_length + 1:
            raise UserError(
                f"{dataset_path}: the {split} split holds {self.tokens_per_epoch} tokens, fewer than one sample of "
                f"seq_length + 1 = {self.seq_length + 1} (seq_length larger than the data can fill)"
            )
        self.num_epochs = num_epochs_for(self.tokens_per_epoch, num_samples, self.seq_length)
        self._length = (self.num_epochs * self.tokens_per_epoch - 1) // self.seq_length
        self.document_index = self.sample_index = self.shuffle_index = None

    @classmethod
    def planned(cls, indexed: IndexedDataset, dataset_path: str, lo: float, hi: float, num_samples, split, config):
        """The split [lo, hi) of the sequences, rounded as Megatron rounds (`round(lo * N)`)."""
        n = len(indexed)
        documents = range(int(round(lo * float(n))), int(round(hi * float(n))))
        return cls(indexed, dataset_path, documents, num_samples, split, config)

    def build(self) -> "GPTDataset":
        arrays = index_cache.cached_arrays(
            self.config.cache_dir, self.cache_base, self._NAMES, self.unique_description, self._build_indices,
            self.index_shapes(),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        return self

    _NAMES = ("document_index", "sample_index", "shuffle_index")

    def index_shapes(self) -> dict:
        """The shapes the three index arrays must have (what a cached copy is checked against)."""
        return {
            "document_index": (self.num_epochs * len(self.documents),),
            "sample_index": (self._length + 1, 2),
            "shuffle_index": (self._length,),
        }

    def _build_indices(self) -> dict:
        seq = self.seq_length
        tokens = self.tokens_per_epoch
        epochs = self.num_epochs
        separate_final_epoch = False
        if epochs > 1:
            samples_sans_final = ((epochs - 1) * tokens - 1) // seq
            samples_from_final = self.num_samples - samples_sans_final
            samples_per_epoch = (tokens - 1) // seq
            separate_final_epoch = samples_from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.RandomState(self.config.seed)
        documents = np.arange(self.documents.start, self.documents.stop, dtype=np.int32)
        document_index = build_document_index(documents, epochs, rng, separate_final_epoch)
        # Megatron drops the last partial sequence in every split (drop_last_partial_validation_sequence
        # defaults to True for the validation split).
        sample_index = build_sample_index(self.indexed.sequence_lengths, document_index, seq, epochs, tokens)
        num_samples = sample_index.shape[0] - 1
        if separate_final_epoch:
            shuffle_index = build_shuffle_index(samples_sans_final, num_samples, rng)
        else:
            shuffle_index = build_shuffle_index(num_samples, num_samples, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def _open_tokens(self) -> None:
        # The whole .bin as one flat array (a read-only mmap), so a batch is a few slice copies; opened
        # on the first read, not while building.
        if os.path.getsize(self.indexed.bin_path):
            self._tokens = np.memmap(self.indexed.bin_path, dtype=self.indexed.dtype, mode="r").view(np.ndarray)
        else:
            self._tokens = np.zeros(0, dtype=self.indexed.dtype)
        self._token_starts = self.indexed.sequence_pointers // self.indexed.dtype.itemsize

    # -- pickling (Grain worker processes): cached indices travel as file names (MappedArray), the
    # token files are reopened ------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("_tokens", "_token_starts"):
            state.pop(name, None)
        return state

    # -- reads --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, idx: int) -> dict:
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sample {idx} out of range for {n} samples")
        text = self._read_one(idx)
        return {"input_ids": text[:-1].copy(), "labels": text[1:].copy()}

    def _read_one(self, idx: int) -> np.ndarray:
        """One sample with scalar indexing (the vectorised path costs more for a single row)."""
        if "_tokens" not in self.__dict__:
            self._open_tokens()
        row = int(self.shuffle_index[idx])
        first, begin = (int(x) for x in self.sample_index[row])
        last, end = (int(x) for x in self.sample_index[row + 1])
        out = np.empty(self.seq_length + 1, dtype=np.int32)
        at = 0
        for position in range(first, last + 1):
            doc = int(self.document_index[position])
            start = begin if position == first else 0
            stop = end + 1 if position == last else int(self.indexed.sequence_lengths[doc])
            pointer = int(self._token_starts[doc]) + start
            out[at:at + stop - start] = self._tokens[pointer:pointer + stop - start]
            at += stop - start
        return out

    def get_batch(self, indices) -> dict:
        """`{"input_ids", "labels"}` as int32 `[len(indices), seq_length]` for these sample indices."""
        text = self.read_text(indices)
        return {"input_ids": text[:, :-1].copy(), "labels": text[:, 1:].copy()}

    def read_text(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """The `seq_length + 1` tokens of each sample, int32 `[len(indices), seq_length + 1]`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        width = self.seq_length + 1
        if out is None:
            out = np.empty((len(indices), width), dtype=np.int32)
        if not len(indices):
            return out
        if "_tokens" not in self.__dict__:
            self._open_tokens()
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"sample indices outside [0, {len(self)})")
        rows = np.asarray(self.shuffle_index[indices], dtype=np.int64)
        begin = np.asarray(self.sample_index[rows], dtype=np.int64)
        end = np.asarray(self.sample_index[rows + 1], dtype=np.int64)
        # Each sample is the pieces of documents begin[0] .. end[0] (positions in document_index).
        pieces = end[:, 0] - begin[:, 0] + 1
        first = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(pieces, out=first[1:])
        total = int(first[-1])
        owner = np.repeat(np.arange(len(indices)), pieces)
        position = begin[owner, 0] + (np.arange(total) - first[owner])
        doc = np.asarray(self.document_index[position], dtype=np.int64)
        is_first = np.zeros(total, dtype=bool)
        is_first[first[:-1]] = True
        is_last = np.zeros(total, dtype=bool)
        is_last[first[1:] - 1] = True
        start = np.where(is_first, begin[owner, 1], 0)
        stop = np.where(is_last, end[owner, 1] + 1, self.indexed.sequence_lengths[doc])
        lengths = stop - start
        source = self._token_starts[doc] + start
        # where each piece lands: the row start plus the lengths of the row's earlier pieces
        before = np.cumsum(lengths) - lengths
        dest = before - before[first[owner]] + owner * width
        if int(lengths.sum()) != len(indices) * width:
            raise RuntimeError("sample index and document lengths disagree (corrupt index cache?)")
        flat = out.reshape(-1)
        tokens = self._tokens
        for s, d, n in zip(source.tolist(), dest.tolist(), lengths.tolist()):
            flat[d:d + n] = tokens[s:s + n]
        return out
