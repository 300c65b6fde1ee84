"""CLI: FineWeb-Edu 10BT parquet -> JSONL, input order and shuffled: the seed's data preparation without lingua.

    python -m jaxpretrain.data.fineweb --data-dir DATA_DIR --seed 42 --nchunks 1 [--memory GB] [--source PARQUET_DIR]

What lingua's `setup/download_prepare_hf_data.py fineweb_edu_10bt MEMORY --data_dir DATA_DIR --seed 42
--nchunks 1` does, in the same layout, with no git clone, no C++ build and no datatrove:

- the parquet shards of `HuggingFaceFW/fineweb-edu` matching `sample/10BT/*` are downloaded with
  `huggingface_hub` into `DATA_DIR/fineweb_edu_10bt/` (or read from `--source`, offline);
- every row becomes one JSON line (`text` and the parquet's other columns), written in input order to
  `DATA_DIR/fineweb_edu_10bt/fineweb_edu_10bt.chunk.NNNNN.jsonl` (lingua's datatrove step: one file
  per parquet shard, 64 at most). These are the files the seed's guide preprocesses;
- all lines are shuffled (terashuf's job), dealt round-robin over `--nchunks` files (`split -n r/N`)
  named `DATA_DIR/fineweb_edu_10bt_shuffled/fineweb_edu_10bt.chunk.NN.jsonl`, and the first
  `--val-lines-per-chunk` lines of each chunk go to `fineweb_edu_10bt.val.jsonl` (lingua's k_validation).

The shuffle is external, so memory stays bounded whatever the input size: pass 1 streams parquet
record batches and scatters each line to one of B bucket files on disk (the bucket drawn uniformly
from a Generator seeded per input file, so workers do not change the result); pass 2 loads one
bucket at a time (B is chosen so one fits in a quarter of `--memory`), permutes it with a seeded
Generator and deals its lines to the chunks. Uniform buckets, each uniformly permuted, make a uniform
permutation of the whole. A fixed seed and `--memory` give the same output (as with terashuf, whose
output also depends on its MEMORY). Outputs are written under temporary names and renamed only when
everything is written.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import decimal
import glob
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from jaxpretrain.errors import UserError, run_cli

DATASET = "fineweb_edu_10bt"
REPO_ID = "HuggingFaceFW/fineweb-edu"
ALLOW_PATTERNS = "sample/10BT/*"
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_CHUNKS = 100  # split's `-d --suffix-length 2` names: 00..99
DATATROVE_TASKS = 64  # lingua's parquet_to_jsonl(ntasks=64)
MAX_BUCKETS = 4096  # bounds the bucket files one worker holds open
# One bucket is loaded whole in pass 2, plus its newline scan (a byte per byte) and line offsets:
# sizing buckets at a quarter of --memory keeps the peak well under it.
BUCKET_FRACTION = 0.25
# JSON adds quotes, keys and escapes to the parquet's uncompressed column bytes; a margin so buckets
# do not come out larger than planned.
JSON_OVERHEAD = 1.3
BATCH_ROWS = 1024  # rows per pyarrow record batch in pass 1
WRITE_BUFFER = 1 << 16  # per bucket file in pass 1, per output file in pass 2


def chunk_name(index: int) -> str:
    """A shuffled chunk (split's `-d --suffix-length 2` numbering)."""
    return f"{DATASET}.chunk.{index:02d}.jsonl"


def conversion_name(rank: int) -> str:
    """An input-order JSONL file (datatrove's `${rank}` numbering); the seed's preprocess reads these."""
    return f"{DATASET}.chunk.{rank:05d}.jsonl"


VAL_NAME = f"{DATASET}.val.jsonl"


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
            raise UserError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
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


def download(data_dir: str) -> str:
    """The 10BT sample into `DATA_DIR/fineweb_edu_10bt/` (resumes a partial download); returns that dir."""
    local_dir = os.path.join(data_dir, DATASET)
    try:
        from huggingface_hub import snapshot_download

        print(f"downloading {REPO_ID} ({ALLOW_PATTERNS}) into {local_dir}", file=sys.stderr, flush=True)
        snapshot_download(repo_id=REPO_ID, repo_type="dataset", allow_patterns=ALLOW_PATTERNS, local_dir=local_dir)
    except Exception as e:  # network, offline mode, auth, disk: all one line for the user
        raise UserError(
            f"{REPO_ID}: download failed ({type(e).__name__}: {_first_line(e)}); "
            f"pass --source PARQUET_DIR to use parquet files already on disk"
        ) from None
    return local_dir


def _first_line(e: BaseException) -> str:
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
            raise UserError(f"{path}: cannot read row data ({_first_line(e)})") from None
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


# -- the whole preparation ---------------------------------------------------------------------------


@dataclass
class Summary:
    files: int
    documents: int
    bytes: int
    chunk_lines: list[int]
    val_lines: int
    buckets: int
    out_dir: str
    jsonl_files: int
    jsonl_dir: str
    seconds: float

    def line(self) -> str:
        converted = f"; in input order: {self.jsonl_files} files in {self.jsonl_dir}" if self.jsonl_files else ""
        return (
            f"fineweb: {self.documents:,} documents ({self.bytes / 1e6:,.1f} MB of JSONL) from {self.files} parquet "
            f"files -> shuffled: {len(self.chunk_lines)} chunks ({sum(self.chunk_lines):,} lines) + {self.val_lines:,} "
            f"validation lines in {self.out_dir}{converted} ({self.buckets} buckets, {self.seconds:.1f} s)"
        )


class _Bar:
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


def conversion_ranks(num_files: int) -> list[list[int]]:
    """lingua's parquet -> JSONL step (datatrove, 64 tasks): task r converts the sorted files r, r+64, ...
    into `fineweb_edu_10bt.chunk.{r:05d}.jsonl`; tasks without a file write nothing."""
    return [list(range(r, num_files, DATATROVE_TASKS)) for r in range(min(num_files, DATATROVE_TASKS))]


def _remove_stale(directory: str, name_of, first: int, last: int) -> None:
    """Files of an earlier, larger run would otherwise join `--input "...chunk.*.jsonl"`."""
    for i in range(first, last):
        stale = os.path.join(directory, name_of(i))
        if os.path.exists(stale):
            os.remove(stale)


def prepare(
    data_dir: str, *, seed: int = 42, nchunks: int = 1, memory_gb: float = 8.0, source: str | None = None,
    val_lines_per_chunk: int = 10000, workers: int | None = None, shuffled_only: bool = False,
) -> Summary:
    start = time.perf_counter()
    if not 1 <= nchunks <= MAX_CHUNKS:
        raise UserError(f"--nchunks: must be between 1 and {MAX_CHUNKS}, got {nchunks}")
    if not memory_gb > 0:
        raise UserError(f"--memory: must be a positive number of GB, got {memory_gb}")
    if val_lines_per_chunk < 0:
        raise UserError(f"--val-lines-per-chunk: must be 0 or more, got {val_lines_per_chunk}")
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    inputs = inspect_inputs(find_parquet_files(source if source is not None else download(data_dir)))
    total_rows = sum(i.rows for i in inputs)
    buckets = num_buckets(sum(i.nbytes for i in inputs), memory_gb * 1e9)
    out_dir = os.path.join(data_dir, f"{DATASET}_shuffled")
    jsonl_dir = os.path.join(data_dir, DATASET)
    try:
        os.makedirs(out_dir, exist_ok=True)
        os.makedirs(jsonl_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data-dir {data_dir}: cannot create its output directories ({e.strerror})") from None

    work_dir = tempfile.mkdtemp(prefix=".fineweb-buckets-", dir=out_dir)
    # Every output is written under a temporary name; `renames` happen only once all are complete.
    tmp_paths, renames = [], []
    try:
        jsonl_parts: list[str | None] = [None] * len(inputs)
        if not shuffled_only:
            jsonl_parts = [os.path.join(jsonl_dir, f".{DATASET}.file{i:05d}.jsonl.tmp") for i in range(len(inputs))]
            tmp_paths += jsonl_parts
        bar = _Bar(total_rows, "pass 1/2: parquet -> JSONL, scattered to buckets")
        documents, nbytes = scatter(inputs, work_dir, buckets, seed, workers, bar, jsonl_parts)
        bar.close()
        if not shuffled_only:
            for r, files in enumerate(conversion_ranks(len(inputs))):
                final = os.path.join(jsonl_dir, conversion_name(r))
                if len(files) == 1:
                    renames.append((jsonl_parts[files[0]], final))
                    continue
                joined = os.path.join(jsonl_dir, f".{conversion_name(r)}.tmp")
                tmp_paths.append(joined)
                with open(joined, "wb") as out:
                    for i in files:
                        with open(jsonl_parts[i], "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 20)
                        os.remove(jsonl_parts[i])
                renames.append((joined, final))

        chunk_tmp = [os.path.join(out_dir, f".{chunk_name(c)}.tmp") for c in range(nchunks)]
        val_parts = [os.path.join(work_dir, f"val.{c:02d}") for c in range(nchunks)]
        tmp_paths += chunk_tmp
        chunk_files = [open(p, "wb", buffering=WRITE_BUFFER) for p in chunk_tmp]
        val_files = [open(p, "wb", buffering=WRITE_BUFFER) for p in val_parts]
        bar = _Bar(documents, "pass 2/2: buckets shuffled, dealt to chunks")
        try:
            kept = deal(len(inputs), work_dir, buckets, seed, chunk_files, val_files, val_lines_per_chunk, bar)
        finally:
            for f in chunk_files + val_files:
                f.close()
        bar.close()
        renames += [(tmp, os.path.join(out_dir, chunk_name(c))) for c, tmp in enumerate(chunk_tmp)]

        # lingua appends `head -n k` of chunk 0, 1, ... to the validation file: the same order here.
        val_tmp = os.path.join(out_dir, f".{VAL_NAME}.tmp")
        tmp_paths.append(val_tmp)
        with open(val_tmp, "wb") as out:
            for p in val_parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        renames.append((val_tmp, os.path.join(out_dir, VAL_NAME)))

        for tmp, final in renames:
            os.replace(tmp, final)
        _remove_stale(out_dir, chunk_name, nchunks, MAX_CHUNKS)
        if not shuffled_only:
            _remove_stale(jsonl_dir, conversion_name, len(conversion_ranks(len(inputs))), DATATROVE_TASKS)
    except OSError as e:
        raise UserError(f"{data_dir}: cannot write the output ({e.strerror or e})") from None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        for p in tmp_paths:
            if p and os.path.exists(p):
                os.remove(p)
    val_total = documents - sum(kept)
    converted = 0 if shuffled_only else len(conversion_ranks(len(inputs)))
    return Summary(len(inputs), documents, nbytes, kept, val_total, buckets, out_dir, converted, jsonl_dir,
                   time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.data.fineweb", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="lingua's --data_dir: downloads go to DATA_DIR/fineweb_edu_10bt, "
                   "output to DATA_DIR/fineweb_edu_10bt_shuffled")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (lingua's default 42)")
    p.add_argument("--nchunks", type=int, default=1, help="number of output chunk files (1 to 100)")
    p.add_argument("--memory", type=float, default=8.0, help="memory budget of the shuffle in GB (lingua's MEMORY)")
    p.add_argument("--source", default=None, help="directory of parquet files to read instead of downloading")
    p.add_argument("--val-lines-per-chunk", type=int, default=10000,
                   help="lines moved from the head of each chunk to fineweb_edu_10bt.val.jsonl (lingua's k_validation)")
    p.add_argument("--workers", type=int, default=None, help="processes converting parquet files (default: min(8, CPUs))")
    p.add_argument("--shuffled-only", action="store_true",
                   help="skip the input-order JSONL in DATA_DIR/fineweb_edu_10bt/ (saves a copy of the data on disk)")
    a = p.parse_args(argv)
    summary = prepare(
        a.data_dir, seed=a.seed, nchunks=a.nchunks, memory_gb=a.memory, source=a.source,
        val_lines_per_chunk=a.val_lines_per_chunk, workers=a.workers, shuffled_only=a.shuffled_only,
    )
    print(summary.line(), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
