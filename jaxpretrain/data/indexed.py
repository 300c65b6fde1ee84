"""Megatron `.bin/.idx` token files: a validating mmap reader and a byte-identical writer.

The format (little-endian), as written by megatron-core's `IndexedDatasetBuilder`:

    .idx  magic b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | sequence count <Q |
          document count <Q | int32[sequences] lengths | int64[sequences] byte pointers |
          int64[document count] document indices (first 0, last = sequence count)
          [| int8[sequences] modes, only in multimodal files]
    .bin  the tokens of every sequence back to back

"Document count" in the header is the length of the document index array, i.e. documents + 1.
Opening validates everything that is cheap to validate, so a truncated, foreign or mismatched pair is
a `UserError` naming the file instead of a silent wrong read later in training.

The writer creates `<name>.partial` files and renames them into place on `finalize`, the `.bin` first
and the `.idx` last: a visible `.idx` therefore always belongs to a complete `.bin`.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from typing import Sequence

import numpy as np

from jaxpretrain.errors import UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
HEADER_SIZE = 34

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_FOR_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Temp-file suffix: an interrupted write leaves only names that no reader or glob for `*.bin` picks up.
PARTIAL_SUFFIX = ".partial"


def get_prefix(path: str) -> str:
    """`data/x_text_document.bin` or `.idx` or the bare prefix -> `data/x_text_document`."""
    path = os.fspath(path)
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Megatron's token dtype choice (`DType.optimal_dtype`): uint16 below 65500 entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def code_for_dtype(dtype) -> int:
    """The `.idx` dtype code of a numpy dtype; ValueError for a dtype the format cannot hold."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_FOR_DTYPE:
        raise ValueError(f"dtype {dtype} has no Megatron .idx code (allowed: {sorted(map(str, _CODE_FOR_DTYPE))})")
    return _CODE_FOR_DTYPE[dtype]


def exists(path_prefix: str) -> bool:
    """True when both files of the pair are present (the `.idx` is written last, so this means complete)."""
    prefix = get_prefix(path_prefix)
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


def _map_file(path: str):
    """Read-only mmap of a whole file; an empty file (cannot be mmap'd) gives empty bytes."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only view of a Megatron `.bin/.idx` pair; sequences come back as mmap'd numpy arrays.

    `len(ds)` is the number of sequences; `ds[i]` is sequence i; `ds.get(i, offset, length)` a slice of
    it (in tokens). `document_indices[d]:document_indices[d+1]` are the sequences of document d.
    """

    def __init__(self, path_prefix: str):
        self.path_prefix = get_prefix(path_prefix)
        self.idx_path = self.path_prefix + ".idx"
        self.bin_path = self.path_prefix + ".bin"
        self._open()

    # -- opening and validation ------------------------------------------------------------------

    def _open(self) -> None:
        idx_path, bin_path = self.idx_path, self.bin_path
        for path in (idx_path, bin_path):
            if os.path.isdir(path):
                raise UserError(f"{path}: is a directory, not a Megatron {'index' if path == idx_path else 'data'} file")
        if not os.path.isfile(idx_path):
            hint = " (the .bin is there: the pair is incomplete, e.g. an interrupted write)" if os.path.isfile(bin_path) else ""
            raise UserError(f"{idx_path}: index file not found{hint}")
        if not os.path.isfile(bin_path):
            raise UserError(f"{bin_path}: data file not found (its index {os.path.basename(idx_path)} exists)")

        idx = _map_file(idx_path)
        idx_size = len(idx)
        if idx_size < HEADER_SIZE:
            if idx_size >= len(INDEX_MAGIC) and bytes(idx[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
                raise UserError(f"{idx_path}: not a Megatron index file (bad magic)")
            raise UserError(f"{idx_path}: truncated index ({idx_size} bytes, the header alone is {HEADER_SIZE})")
        if bytes(idx[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
            raise UserError(f"{idx_path}: not a Megatron index file (bad magic)")
        version, code, num_sequences, num_doc_indices = struct.unpack_from("<QBQQ", idx, len(INDEX_MAGIC))
        if version != INDEX_VERSION:
            raise UserError(f"{idx_path}: unsupported index version {version} (expected {INDEX_VERSION})")
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = DTYPE_CODES[code]

        arrays_size = num_sequences * (4 + 8) + num_doc_indices * 8
        expected = HEADER_SIZE + arrays_size
        # Multimodal files append one int8 mode per sequence; accept them, the modes are not used here.
        if idx_size == expected + num_sequences and num_sequences > 0:
            has_modes = True
        elif idx_size == expected:
            has_modes = False
        elif idx_size < expected:
            raise UserError(
                f"{idx_path}: truncated index ({idx_size} bytes; the header promises {num_sequences} sequences and "
                f"{num_doc_indices} document indices = {expected} bytes)"
            )
        else:
            raise UserError(f"{idx_path}: {idx_size - expected} unexpected trailing bytes (expected {expected} bytes)")

        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=num_sequences, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=num_sequences, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=num_doc_indices, offset=offset)
        offset += self.document_indices.nbytes
        self.sequence_modes = np.frombuffer(idx, dtype=np.int8, count=num_sequences, offset=offset) if has_modes else None
        self._idx = idx

        if num_doc_indices < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != num_sequences:
            raise UserError(
                f"{idx_path}: corrupt document index (must start at 0 and end at the sequence count {num_sequences})"
            )

        bin_size = os.path.getsize(bin_path)
        if num_sequences:
            expected_bin = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        else:
            expected_bin = 0
        if bin_size != expected_bin:
            what = "truncated" if bin_size < expected_bin else "larger than its index says"
            raise UserError(
                f"{bin_path}: data file {what} ({bin_size} bytes; {os.path.basename(idx_path)} says {expected_bin})"
            )
        self._bin = _map_file(bin_path)

    # -- pickling: reopen by path in the new process instead of copying the mapped arrays ------------

    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"])

    # -- access ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1)")
            if stop <= start:
                return []
            lengths = self.sequence_lengths[start:stop]
            tokens = np.frombuffer(
                self._bin, dtype=self.dtype, count=int(lengths.sum(dtype=np.int64)),
                offset=int(self.sequence_pointers[start]),
            )
            return np.split(tokens, np.cumsum(lengths[:-1], dtype=np.int64))
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `idx` (to its end when length is None)."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.path_prefix}")
        seq_length = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_length - offset
        if offset < 0 or length < 0 or offset + length > seq_length:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {seq_length}"
            )
        pointer = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=pointer)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, dtype={self.dtype}, sequences={len(self)}, "
            f"documents={self.num_documents})"
        )


def _write_index(path: str, dtype: np.dtype, lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an `.idx` exactly as megatron-core's `_IndexWriter` does (no modes)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    with open(path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", code_for_dtype(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes(order="C"))


class IndexedDatasetBuilder:
    """Writes a `.bin/.idx` pair byte-identical to megatron-core's `IndexedDatasetBuilder`.

    Same calls as Megatron (`add_item`, `end_document`, `add_document`, `add_index`, `finalize`), plus
    `add_documents(tokens, document_lengths)` to append many single-sequence documents from flat numpy
    arrays at once. Usable as a context manager: leaving the block by an exception removes the
    partial file.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype)
        code_for_dtype(self.dtype)  # fail now, not at finalize
        self._partial_bin = self.bin_path + PARTIAL_SUFFIX
        try:
            self._data_file = open(self._partial_bin, "wb")
        except OSError as e:
            raise UserError(f"{self._partial_bin}: cannot write ({e.strerror})") from None
        # Lengths and document boundaries as chunks of numpy arrays, so that the bulk path does not go
        # through Python ints; per-item calls collect into the plain lists and are flushed in order.
        self._length_chunks: list[np.ndarray] = []
        self._doc_chunks: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._pending_lengths: list[int] = []
        self._pending_docs: list[int] = []
        self._num_sequences = 0
        self._finalized = False

    # -- Megatron's calls --------------------------------------------------------------------------

    def add_item(self, tokens) -> None:
        """Append one sequence (any array-like of ids, a torch tensor included)."""
        array = self._as_tokens(tokens)
        self._data_file.write(array.tobytes(order="C"))
        self._pending_lengths.append(array.size)
        self._num_sequences += 1

    def end_document(self) -> None:
        """Close the current document after one or more `add_item` calls."""
        self._pending_docs.append(self._num_sequences)

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append one document made of sequences of the given lengths (tokens flat)."""
        array = self._as_tokens(tokens)
        self._data_file.write(array.tobytes(order="C"))
        self._pending_lengths.extend(int(n) for n in lengths)
        self._num_sequences += len(lengths)
        self._pending_docs.append(self._num_sequences)

    def add_index(self, path_prefix: str) -> None:
        """Append a whole existing `.bin/.idx` pair (same dtype) after what was written so far."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{other.idx_path}: dtype {other.dtype} differs from the builder's {self.dtype}")
        self._flush_pending()
        self._length_chunks.append(np.array(other.sequence_lengths, dtype=np.int32))
        self._doc_chunks.append(np.asarray(other.document_indices[1:], dtype=np.int64) + self._num_sequences)
        self._num_sequences += len(other)
        with open(other.bin_path, "rb") as f:
            shutil.copyfileobj(f, self._data_file, length=16 << 20)

    # -- bulk path ---------------------------------------------------------------------------------

    def add_documents(self, tokens: np.ndarray, document_lengths: np.ndarray) -> None:
        """Append `len(document_lengths)` documents, each one sequence, from one flat token array.

        Same bytes as calling `add_item(doc); end_document()` per document, without per-document Python.
        """
        array = self._as_tokens(tokens)
        lengths = np.asarray(document_lengths, dtype=np.int64)
        if int(lengths.sum()) != array.size:
            raise ValueError(f"document lengths sum to {int(lengths.sum())} but {array.size} tokens were given")
        self._flush_pending()
        self._data_file.write(array.tobytes(order="C"))
        self._length_chunks.append(lengths.astype(np.int32))
        self._doc_chunks.append(self._num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64))
        self._num_sequences += len(lengths)

    # -- finishing ---------------------------------------------------------------------------------

    def finalize(self, idx_path: str) -> None:
        """Write the `.idx` and move both files into place (`.bin` first, the `.idx` last)."""
        idx_path = os.fspath(idx_path)
        self._flush_pending()
        self._data_file.close()
        lengths = np.concatenate(self._length_chunks) if self._length_chunks else np.zeros(0, np.int32)
        document_indices = np.concatenate(self._doc_chunks)
        partial_idx = idx_path + PARTIAL_SUFFIX
        _write_index(partial_idx, self.dtype, lengths, document_indices)
        # An older .idx must not sit next to the new .bin, not even between the two renames.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(self._partial_bin, self.bin_path)
        os.replace(partial_idx, idx_path)
        self._finalized = True

    def abort(self) -> None:
        """Drop everything written so far (removes the partial `.bin`)."""
        if not self._data_file.closed:
            self._data_file.close()
        if os.path.exists(self._partial_bin):
            os.remove(self._partial_bin)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._finalized:
            self.abort()

    # -- helpers -----------------------------------------------------------------------------------

    def _as_tokens(self, tokens) -> np.ndarray:
        if hasattr(tokens, "numpy") and not isinstance(tokens, np.ndarray):  # torch tensor
            tokens = tokens.numpy()
        if isinstance(tokens, np.ndarray):
            # Megatron casts with numpy too; refuse the silent wraparound of ids that do not fit.
            if tokens.size and self.dtype.kind in "iu" and tokens.dtype.kind in "iu" and tokens.dtype != self.dtype:
                info = np.iinfo(self.dtype)
                if tokens.min() < info.min or tokens.max() > info.max:
                    raise ValueError(f"token ids outside [{info.min}, {info.max}] do not fit dtype {self.dtype}")
            return np.ascontiguousarray(tokens, dtype=self.dtype).reshape(-1)
        return np.array(tokens, dtype=self.dtype).reshape(-1)

    def _flush_pending(self) -> None:
        if self._pending_lengths:
            self._length_chunks.append(np.array(self._pending_lengths, dtype=np.int32))
            self._pending_lengths = []
        if self._pending_docs:
            self._doc_chunks.append(np.array(self._pending_docs, dtype=np.int64))
            self._pending_docs = []
