"""Preprocessing's work: inputs cut into units (byte ranges of JSONL, row groups of parquet) and the
worker that turns one unit into token arrays. `jaxpretrain.preprocess` plans, runs the pool and writes.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from jaxpretrain.errors import UserError, keep_torch_out

# Work unit size: small enough to spread one file over the workers and bound memory, big enough that
# per-unit overhead (pickling results, one write call) stays negligible.
MAX_UNIT_BYTES = 32 << 20
MIN_UNIT_BYTES = 1 << 20
PARQUET_SUFFIXES = (".parquet", ".pq")


# -- the plan: inputs, outputs, units ----------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One piece of work: the lines starting in `[start, end)` of a JSONL file, or some parquet row groups."""

    file_index: int
    path: str
    kind: str  # "json" or "parquet"
    start: int = 0
    end: int = 0
    row_groups: tuple[int, ...] = ()
    nbytes: int = 0  # for the progress bar


def resolve_inputs(patterns: str | list[str]) -> list[str]:
    """Sorted, de-duplicated files matched by one or more globs (`**` allowed)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = set()
    for pattern in patterns:
        matches = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matches:
            raise UserError(f"--input {pattern}: no file matches")
        files.update(matches)
    for path in files:
        if not os.access(path, os.R_OK):
            raise UserError(f"{path}: not readable")
    return sorted(files)


def input_kind(path: str, input_type: str) -> str:
    if input_type == "auto":
        return "parquet" if path.lower().endswith(PARQUET_SUFFIXES) else "json"
    return input_type


def output_prefix_for(output_prefix: str, output_path: str | None, index: int, key: str) -> str:
    """Automodel's naming: `--output-path` replaces the directory part of `--output-prefix`."""
    if output_path:
        base = os.path.join(output_path, f"{os.path.basename(output_prefix)}_{index}")
    else:
        base = f"{output_prefix}_{index}"
    return f"{base}_{key}_document"


def plan_units(files: list[str], input_type: str, workers: int, unit_bytes: int | None = None) -> list[Unit]:
    """Cut every input into units, in output order; each file gets at least one (maybe empty) unit."""
    sizes = [os.path.getsize(p) for p in files]
    if unit_bytes is None:
        # About 8 units per worker over the whole run keeps workers evenly loaded till the end.
        unit_bytes = min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, sum(sizes) // max(1, 8 * workers)))
    units = []
    for index, (path, size) in enumerate(zip(files, sizes)):
        kind = input_kind(path, input_type)
        if kind == "parquet":
            units.extend(_parquet_units(index, path, unit_bytes))
            continue
        starts = list(range(0, size, unit_bytes)) or [0]
        for start in starts:
            end = min(size, start + unit_bytes)
            units.append(Unit(index, path, "json", start=start, end=end, nbytes=end - start))
    return units


def _parquet_units(index: int, path: str, unit_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    file_size = os.path.getsize(path)
    total = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) or 1
    units, group, group_bytes = [], [], 0
    for g in range(meta.num_row_groups):
        group.append(g)
        group_bytes += meta.row_group(g).total_byte_size
        if group_bytes >= unit_bytes:
            units.append(Unit(index, path, "parquet", row_groups=tuple(group), nbytes=group_bytes * file_size // total))
            group, group_bytes = [], 0
    if group or not units:
        units.append(Unit(index, path, "parquet", row_groups=tuple(group), nbytes=group_bytes * file_size // total))
    return units


# -- the worker side -----------------------------------------------------------------------------------


@dataclass
class WorkerConfig:
    keys: tuple[str, ...]
    append_eod: bool
    eos_id: int | None
    dtype: str
    fast_gpt2: bool  # tiktoken GPT-2 encoder, else HF
    tokenizer_name: str | None
    text_column: str | None = None


@dataclass
class UnitResult:
    file_index: int
    nbytes: int
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokens: dict = field(default_factory=dict)  # key -> flat token array
    lengths: dict = field(default_factory=dict)  # key -> tokens per document
    keys_seen: Counter = field(default_factory=Counter)  # keys of rows that lacked a requested key


_WORKER: dict = {}  # per-process state set by init_worker: config and encoder


def init_worker(config: WorkerConfig, fast_encoder=None) -> None:
    """Set up tokenization in this process. `fast_encoder`: one built already (inherited through fork)."""
    _WORKER["config"] = config
    if multiprocessing.parent_process() is not None:  # a pool worker of ours: it only tokenizes
        keep_torch_out()
    if config.fast_gpt2:
        from jaxpretrain.tokenizer import GPT2FastEncoder

        _WORKER["encode_batch"] = _fast_encode_batch(fast_encoder or GPT2FastEncoder())
    else:
        # One process per core already; tokenizers' own thread pool would only oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from jaxpretrain.tokenizer import load_tokenizer

        _WORKER["encode_batch"] = _hf_encode_batch(load_tokenizer(config.tokenizer_name))


def _fast_encode_batch(encoder):
    def encode_batch(texts: list[str]) -> list[np.ndarray]:
        return [encoder.encode_to_numpy(t) for t in texts]

    return encode_batch


def _hf_encode_batch(tokenizer):
    def encode_batch(texts: list[str]) -> list[np.ndarray]:
        # A batch call gives the same ids as `tokenizer(text)` per text (no padding, no truncation).
        return [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts).input_ids] if texts else []

    return encode_batch


def process_unit(unit: Unit) -> UnitResult:
    config: WorkerConfig = _WORKER["config"]
    result = UnitResult(unit.file_index, unit.nbytes)
    if unit.kind == "parquet":
        rows = _parquet_rows(unit, config, result.skipped, result.keys_seen)
    else:
        rows = _json_rows(unit, config.keys, result.skipped, result.keys_seen)
    columns: dict[str, list[str]] = {key: [] for key in config.keys}
    for row in rows:
        for key, text in zip(config.keys, row):
            columns[key].append(text)
    encode_batch = _WORKER["encode_batch"]
    encoded = {key: encode_batch(texts) for key, texts in columns.items()}
    # A text that gives no tokens at all (possible with some tokenizers) is dropped for every key.
    n = len(columns[config.keys[0]])
    keep = np.ones(n, dtype=bool)
    for ids in encoded.values():
        keep &= np.fromiter((len(x) > 0 for x in ids), dtype=bool, count=n)
    if not keep.all():
        result.skipped["text gives no tokens"] += int((~keep).sum())
    dtype = np.dtype(config.dtype)
    for key, ids in encoded.items():
        kept = [x for x, k in zip(ids, keep) if k]
        if config.append_eod:
            eod = np.array([config.eos_id], dtype=dtype)
            parts = [piece for x in kept for piece in (x, eod)]
            lengths = np.fromiter((len(x) + 1 for x in kept), dtype=np.int64, count=len(kept))
        else:
            parts = kept
            lengths = np.fromiter((len(x) for x in kept), dtype=np.int64, count=len(kept))
        tokens = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        result.tokens[key] = tokens
        result.lengths[key] = lengths
    result.documents = int(keep.sum())
    return result


def _read_lines(unit: Unit) -> list[bytes]:
    """The lines that start in `[unit.start, unit.end)`, each complete (a line is owned by its start)."""
    with open(unit.path, "rb") as f:
        if unit.start > 0:
            f.seek(unit.start - 1)
            f.readline()  # the rest of the line that started before us; just b"\n" if one starts at `start`
        position = f.tell()
        if position >= unit.end:
            return []
        data = f.read(unit.end - position)
        if not data.endswith(b"\n"):
            data += f.readline()
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the empty piece after the final newline is not a line
    return lines


def _check_text(text) -> str | None:
    """Why a value cannot be tokenized as a document, or None when it can."""
    if text is None:
        return "null text"
    if not isinstance(text, str):
        return "text is not a string"
    if not text:
        return "empty text"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "invalid unicode (lone surrogate)"
    return None


def _json_rows(unit: Unit, keys: tuple[str, ...], skipped: Counter, keys_seen: Counter):
    for raw in _read_lines(unit):
        if not raw.strip():
            skipped["blank line"] += 1
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid UTF-8"] += 1
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped["bad JSON"] += 1
            continue
        if not isinstance(row, dict):
            skipped["not a JSON object"] += 1
            continue
        texts, reason = [], None
        for key in keys:
            if key not in row:
                reason = f"missing key {key!r}"
                keys_seen.update(row.keys())
                break
            reason = _check_text(row[key])
            if reason:
                break
            texts.append(row[key])
        if reason:
            skipped[reason] += 1
            continue
        yield texts


def _parquet_rows(unit: Unit, config: WorkerConfig, skipped: Counter, keys_seen: Counter):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.path)
    present = set(parquet.schema_arrow.names)
    num_rows = sum(parquet.metadata.row_group(g).num_rows for g in unit.row_groups)
    missing = [key for key in config.keys if key not in present]
    if missing:
        if num_rows:
            skipped[f"missing key {missing[0]!r}"] += num_rows
            keys_seen.update({name: num_rows for name in present})
        return
    if not unit.row_groups:
        return
    table = parquet.read_row_groups(list(unit.row_groups), columns=list(config.keys))
    columns = [table.column(key).to_pylist() for key in config.keys]
    for texts in zip(*columns):
        reason = next((r for r in map(_check_text, texts) if r), None)
        if reason:
            skipped[reason] += 1
            continue
        yield list(texts)
