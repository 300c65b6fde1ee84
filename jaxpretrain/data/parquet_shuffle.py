"""Parquet rows -> JSON lines, shuffled externally: memory bounded by a budget, whatever the input size.

Pass 1 (`scatter`) streams each parquet file's record batches and writes every row as one JSON line to
one of B bucket files on disk, the bucket drawn uniformly from a Generator seeded by (seed, file
index), so the result does not depend on how files are spread over worker processes; a file's lines
can also be written in input order on the way. Pass 2 (`deal`) loads one bucket at a time, permutes it
with a Generator seeded by (seed, bucket) and deals the lines round-robin to the output files.
Uniform buckets, each uniformly permuted, make a uniform permutation of the whole (the classic
two-pass external shuffle). B is chosen (`num_buckets`) so one bucket fits in a quarter of the budget.
Nothing here knows FineWeb: `jaxpretrain.data.fineweb` is the CLI with lingua's layout.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import glob
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from jaxpretrain.errors import UserError

PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_BUCKETS = 4096  # bounds the bucket files one worker holds open
# One bucket is loaded whole in pass 2, plus its newline scan (a byte per byte) and line offsets:
# sizing buckets at a quarter of the budget keeps the peak well under it.
BUCKET_FRACTION = 0.25
# JSON adds quotes, keys and escapes to the parquet's uncompressed column bytes; a margin so buckets
# do not come out larger than planned.
JSON_OVERHEAD = 1.3
BATCH_ROWS = 1024  # rows per pyarrow record batch in pass 1
WRITE_BUFFER = 1 << 16  # per bucket file in pass 1, per output file in pass 2


# -- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParquetInput:
    path: str
    rows: int
    nbytes: int  # uncompressed bytes of all columns (pyarrow metadata): the size estimate


def find_parquet_files(source: str) -> list[str]:
    """Sorted parquet files under `source` (a directory, searched recursively, or one file)."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise UserError(f"--source {source}: no such directory")
    files = sorted(
        p for p in glob.glob(os.path.join(glob.escape(source), "**", "*"), recursive=True)
        if p.lower().endswith(PARQUET_SUFFIXES) and os.path.isfile(p)
    )
    if not files:
        raise UserError(f"{source}: holds no parquet files (*.parquet)")
    return files


def inspect_inputs(files: list[str]) -> list[ParquetInput]:
    """Open every file's footer before any work: unreadable files and a missing `text` column fail here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise UserError(f"{path}: not a readable parquet file ({first_line(e)})") from None
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise UserError(f"{path}: no `text` column (columns: {', '.join(schema.names)})")
        text_type = schema.field("text").type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
            raise UserError(f"{path}: column `text` is {text_type}, not a string")
        meta = pf.metadata
        nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        inputs.append(ParquetInput(path, meta.num_rows, nbytes))
    return inputs


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- pass 1: parquet rows -> JSON lines scattered over bucket files --------------------------------


def _json_default(value):
    """JSON for the parquet values json cannot write itself (timestamps, decimals, binary)."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def num_buckets(total_bytes: int, memory_bytes: float) -> int:
    """Enough buckets that one (JSON-sized) fits in BUCKET_FRACTION of the memory budget."""
    target = max(1.0, memory_bytes * BUCKET_FRACTION)
    return int(min(MAX_BUCKETS, max(1, math.ceil(total_bytes * JSON_OVERHEAD / target))))


def bucket_part(work_dir: str, bucket: int, file_index: int) -> str:
    return os.path.join(work_dir, f"bucket{bucket:05d}.file{file_index:05d}")


_progress_rows = None  # a shared counter the workers add to (set by the pool initializer)


def _init_worker(counter) -> None:
    global _progress_rows
    _progress_rows = counter


def scatter_file(
    file_index: int, path: str, work_dir: str, buckets: int, seed: int, jsonl_path: str | None,
) -> tuple[int, int]:
    """Write the rows of one parquet file, as JSON lines, to its B bucket parts (and, in input order,
    to `jsonl_path` if given); returns (rows, bytes).

    The bucket of each row comes from a Generator seeded by (seed, file index): the scatter does not
    depend on which worker runs which file, or when.
    """
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, 0, file_index])
    outs = [open(bucket_part(work_dir, b, file_index), "wb", buffering=WRITE_BUFFER) for b in range(buckets)]
    in_order = open(jsonl_path, "wb", buffering=1 << 20) if jsonl_path else None
    rows = nbytes = 0
    encode = json.JSONEncoder(ensure_ascii=False, default=_json_default).encode
    try:
        try:
            # Single-threaded decoding: the workers are the parallelism, and arrow's thread pool would
            # grow each process's memory by tens of MB (per-thread allocator arenas) for no speed.
            batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, use_threads=False)
            for batch in batches:
                targets = rng.integers(0, buckets, size=batch.num_rows)
                for record, b in zip(batch.to_pylist(), targets.tolist()):
                    line = (encode(record) + "\n").encode("utf-8")
                    outs[b].write(line)
                    if in_order is not None:
                        in_order.write(line)
                    nbytes += len(line)
                rows += batch.num_rows
                if _progress_rows is not None:
                    with _progress_rows.get_lock():
                        _progress_rows.value += batch.num_rows
        except (OSError, ValueError) as e:  # pyarrow's read errors are ArrowException (an OSError/ValueError)
            raise UserError(f"{path}: cannot read row data ({first_line(e)})") from None
    finally:
        for f in outs + ([in_order] if in_order is not None else []):
            f.close()
    return rows, nbytes


def _scatter_star(args) -> tuple[int, int]:
    return scatter_file(*args)


def scatter(
    inputs: list[ParquetInput], work_dir: str, buckets: int, seed: int, workers: int, progress,
    jsonl_paths: list[str | None],
) -> tuple[int, int]:
    """Pass 1 over all files, `workers` at a time; returns total (rows, bytes)."""
    jobs = [(i, inp.path, work_dir, buckets, seed, jsonl_paths[i]) for i, inp in enumerate(inputs)]
    if workers == 1 or len(jobs) == 1:
        rows = nbytes = 0
        for job in jobs:
            r, n = scatter_file(*job)
            rows, nbytes = rows + r, nbytes + n
            progress.update(r)
        return rows, nbytes
    # fork: nothing here holds threads or JAX; workers start in milliseconds.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    counter = ctx.Value("q", 0)
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(counter,)) as pool:
        result = pool.map_async(_scatter_star, jobs, chunksize=1)
        shown = 0
        while not result.ready():
            result.wait(0.25)
            progress.update(counter.value - shown)
            shown = counter.value
        parts = result.get()  # re-raises a worker's UserError here
        progress.update(counter.value - shown)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


# -- pass 2: each bucket shuffled in memory, dealt round-robin to the chunks ------------------------


def read_bucket(work_dir: str, bucket: int, num_files: int) -> bytearray:
    """Bucket `bucket`'s parts from every input file, in file order, as one buffer; the parts are deleted."""
    paths = [bucket_part(work_dir, bucket, i) for i in range(num_files)]
    buf = bytearray(sum(os.path.getsize(p) for p in paths))
    view, pos = memoryview(buf), 0
    for p in paths:
        with open(p, "rb") as f:
            while True:
                n = f.readinto(view[pos:])
                if not n:
                    break
                pos += n
        os.remove(p)  # the disk holds one copy of the data at a time, not two
    return buf


def deal(
    inputs_count: int, work_dir: str, buckets: int, seed: int, chunk_files: list, val_files: list,
    val_lines: int, progress,
) -> list[int]:
    """Pass 2: line j of the shuffled stream goes to chunk j % N at position j // N (split -n r/N);
    the first `val_lines` positions of each chunk go to that chunk's validation part. Returns the
    number of lines each chunk kept."""
    nchunks = len(chunk_files)
    j = 0  # index of the next line in the shuffled stream
    for b in range(buckets):
        buf = read_bucket(work_dir, b, inputs_count)
        if not buf:
            continue
        ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + 1
        starts = np.concatenate(([0], ends[:-1]))
        order = np.random.default_rng([seed, 1, b]).permutation(len(ends))
        stream = np.arange(j, j + len(ends))
        chunk_of, to_val = stream % nchunks, stream // nchunks < val_lines
        view = memoryview(buf)
        for lo, hi, c, v in zip(starts[order].tolist(), ends[order].tolist(), chunk_of.tolist(), to_val.tolist()):
            (val_files if v else chunk_files)[c].write(view[lo:hi])
        j += len(ends)
        view.release()
        del buf
        progress.update(len(ends))
    return [max(0, len(range(c, j, nchunks)) - val_lines) for c in range(nchunks)]


# -- progress ----------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal; in logs, one line when the pass ends."""

    def __init__(self, total: int, desc: str):
        self.desc, self.total, self.done = desc, total, 0
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", unit_scale=True, desc=desc, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"{self.desc}: {self.done:,} documents in {time.perf_counter() - self.start:.1f} s", file=sys.stderr, flush=True)
