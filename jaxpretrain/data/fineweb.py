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

The shuffle is external (`jaxpretrain/data/parquet_shuffle.py`): rows are scattered to bucket files
on disk, then one bucket at a time is shuffled in memory, so `--memory` bounds the memory whatever the
input size. A fixed seed and `--memory` give the same output (as with terashuf, whose output also
depends on its MEMORY). Outputs are written under temporary names and renamed only when everything
is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from jaxpretrain.data.parquet_shuffle import (
    Progress,
    deal,
    find_parquet_files,
    first_line,
    inspect_inputs,
    num_buckets,
    scatter,
)
from jaxpretrain.errors import UserError, run_cli

DATASET = "fineweb_edu_10bt"
REPO_ID = "HuggingFaceFW/fineweb-edu"
ALLOW_PATTERNS = "sample/10BT/*"
MAX_CHUNKS = 100  # split's `-d --suffix-length 2` names: 00..99
DATATROVE_TASKS = 64  # lingua's parquet_to_jsonl(ntasks=64)
WRITE_BUFFER = 1 << 16  # per output file


def chunk_name(index: int) -> str:
    """A shuffled chunk (split's `-d --suffix-length 2` numbering)."""
    return f"{DATASET}.chunk.{index:02d}.jsonl"


def conversion_name(rank: int) -> str:
    """An input-order JSONL file (datatrove's `${rank}` numbering); the seed's preprocess reads these."""
    return f"{DATASET}.chunk.{rank:05d}.jsonl"


VAL_NAME = f"{DATASET}.val.jsonl"


# -- download --------------------------------------------------------------------------------------


def download(data_dir: str) -> str:
    """The 10BT sample into `DATA_DIR/fineweb_edu_10bt/` (resumes a partial download); returns that dir."""
    local_dir = os.path.join(data_dir, DATASET)
    try:
        from huggingface_hub import snapshot_download

        print(f"downloading {REPO_ID} ({ALLOW_PATTERNS}) into {local_dir}", file=sys.stderr, flush=True)
        snapshot_download(repo_id=REPO_ID, repo_type="dataset", allow_patterns=ALLOW_PATTERNS, local_dir=local_dir)
    except Exception as e:  # network, offline mode, auth, disk: all one line for the user
        raise UserError(
            f"{REPO_ID}: download failed ({type(e).__name__}: {first_line(e)}); "
            f"pass --source PARQUET_DIR to use parquet files already on disk"
        ) from None
    return local_dir


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


def _check_chunks_keep_lines(total_rows: int, nchunks: int, val_lines: int) -> None:
    """Every chunk must keep a training line: known from the parquet footers, before any work.

    lingua's `head`/`sed` would leave an empty chunk (all its lines gone to validation) without a word;
    an empty chunk is no training data, and preprocess rejects it (or writes an empty pair) later on.
    """
    smallest = total_rows // nchunks  # round-robin dealing: chunks differ by one line at most
    if smallest == 0:
        raise UserError(f"--nchunks {nchunks}: the input has only {total_rows:,} rows, so a chunk would be empty")
    if smallest <= val_lines:
        raise UserError(
            f"--val-lines-per-chunk {val_lines:,}: the input's {total_rows:,} rows give {smallest:,} lines to a "
            f"chunk (--nchunks {nchunks}), so it would keep no training line; use at most {smallest - 1:,}"
        )


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
    if workers is None:  # not `workers or ...`: an explicit 0 is a mistake to report, not the default
        workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    inputs = inspect_inputs(find_parquet_files(source if source is not None else download(data_dir)))
    total_rows = sum(i.rows for i in inputs)
    _check_chunks_keep_lines(total_rows, nchunks, val_lines_per_chunk)
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
        bar = Progress(total_rows, "pass 1/2: parquet -> JSONL, scattered to buckets")
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
        bar = Progress(documents, "pass 2/2: buckets shuffled, dealt to chunks")
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
