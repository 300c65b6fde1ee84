"""Token files against the model's vocabulary: a dtype that can hold it, and every id inside it.

On a GPU an embedding lookup of an id >= vocab_size does not fail: XLA clamps the gather, so a file
written by another tokenizer trains silently on wrong tokens. So before any index work, every `.bin`
is checked once: its dtype must be an integer type wide enough for the vocabulary, and its smallest
and largest id must lie in [0, vocab_size). Finding them is one vectorised pass over the file (a few
GB/s per core, see docs/performance.md); the result is remembered in the index cache directory as
`{md5 of the path}-token_range.json`, keyed by the file's path, size and mtime, so later runs pay
nothing until the file changes.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jaxpretrain.atomic import save_atomic
from jaxpretrain.data.indexed import IndexedDataset
from jaxpretrain.errors import UserError

# Tokens per reduction: small enough that min and max read the chunk from cache, large enough that
# the per-chunk Python cost vanishes.
_CHUNK = 1 << 22


def check_dtype(indexed: IndexedDataset, vocab_size: int) -> None:
    """A float dtype, or an integer one too narrow for `vocab_size` ids, means the files were not
    written for this model's tokenizer (Megatron writes uint16 below 65500 tokens, else int32)."""
    dtype = indexed.dtype
    if dtype.kind not in "iu":
        raise UserError(f"{indexed.idx_path}: dtype {dtype} cannot hold token ids (an integer dtype is needed)")
    top = int(np.iinfo(dtype).max)
    if top < vocab_size - 1:
        raise UserError(
            f"{indexed.idx_path}: dtype {dtype} holds ids up to {top}, but the model's vocabulary has {vocab_size} "
            f"tokens (files written for another tokenizer? re-tokenize, or set model.vocab_size)"
        )


def token_range(indexed: IndexedDataset, cache_dir: str | None = None) -> tuple[int, int] | None:
    """(smallest id, largest id) in the `.bin` (for unsigned dtypes the smallest is given as 0), None
    when it holds no tokens; remembered in `cache_dir`."""
    stat = os.stat(indexed.bin_path)
    key = {"path": os.path.realpath(indexed.bin_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "dtype": str(indexed.dtype)}
    cache_path = None
    if cache_dir is not None:
        name = hashlib.md5(key["path"].encode("utf-8"), usedforsecurity=False).hexdigest()
        cache_path = os.path.join(cache_dir, f"{name}-token_range.json")
        found = _read_cache(cache_path)
        if found is not None and {k: found.get(k) for k in key} == key:
            return None if found["min"] is None else (found["min"], found["max"])
    result = _scan(indexed)
    if cache_path is not None:
        record = {**key, "min": None if result is None else result[0], "max": None if result is None else result[1]}
        _write_cache(cache_path, record)
    return result


def check_token_ids(indexed: IndexedDataset, vocab_size: int, cache_dir: str | None = None) -> None:
    """One UserError naming the `.bin`, the offending id and the vocabulary size, if any id is outside."""
    found = token_range(indexed, cache_dir)
    if found is None:
        return
    low, high = found
    if high >= vocab_size:
        raise UserError(
            f"{indexed.bin_path}: largest token id {high} >= the model's vocabulary size {vocab_size} "
            f"(written by another tokenizer? re-tokenize, or set model.vocab_size)"
        )
    if low < 0:
        raise UserError(f"{indexed.bin_path}: negative token id {low} (not a token file?)")


def _scan(indexed: IndexedDataset) -> tuple[int, int] | None:
    size = os.path.getsize(indexed.bin_path) // indexed.dtype.itemsize
    if size == 0:
        return None
    tokens = np.memmap(indexed.bin_path, dtype=indexed.dtype, mode="r", shape=(size,))
    # Unsigned ids cannot be negative: 0 is their lower bound, and one reduction per chunk is enough.
    signed = indexed.dtype.kind == "i"
    low, high = (int(np.iinfo(indexed.dtype).max), 0) if signed else (0, 0)
    for start in range(0, size, _CHUNK):
        chunk = tokens[start:start + _CHUNK]
        high = max(high, int(chunk.max()))
        if signed:
            low = min(low, int(chunk.min()))
    del tokens
    return low, high


def _read_cache(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None  # absent, unreadable or damaged: scan again
    return record if isinstance(record, dict) else None


def _write_cache(path: str, record: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(path, lambda f: f.write(json.dumps(record).encode("utf-8")))
    except OSError:
        pass  # a cache that cannot be written only costs the next run the same scan
