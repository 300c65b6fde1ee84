"""CLI: JSONL / parquet text -> Megatron `.bin/.idx` token files, in parallel.

    python -m jaxpretrain.preprocess --input "data/*.jsonl" --json-keys text --output-prefix processed_data \\
        --output-path out/ --workers 8 --pretrained-model-name-or-path openai-community/gpt2 --append-eod

The flags and outputs are those of NeMo Automodel's `tools/preprocess_megatron_dataset.py`: inputs are
taken in sorted order and input i writes `{output_path}/{prefix}_{i}_{key}_document.bin/.idx`, holding
`tokenizer(text).input_ids` (+ eos with `--append-eod`) per document, byte-identical to megatron-core's
`IndexedDatasetBuilder`. What differs is how the work is done:

- Every input is cut into units (byte ranges on line boundaries for JSONL, row groups for parquet), so
  one huge file keeps all workers busy as well as many small ones do. Units are processed by a pool and
  written back in order, so the output does not depend on `--workers`.
- The GPT-2 BPE is encoded with tiktoken (`jaxpretrain.tokenizer.GPT2FastEncoder`, same ids as HF);
  other tokenizers go through HF in batches.
- Bad rows (blank lines, invalid UTF-8, bad JSON, a missing key, null/empty/non-string text) are
  skipped and counted, never fatal; a row bad in any of the keys is skipped for all of them, so the
  outputs of several keys stay aligned document by document.
- Outputs appear atomically (see `IndexedDatasetBuilder`).
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from jaxpretrain.data.indexed import IndexedDatasetBuilder, dtype_for_vocab
from jaxpretrain.errors import UserError, keep_torch_out, run_cli
from jaxpretrain.tokenizer import GPT2_EOS_ID, GPT2_VOCAB_SIZE, is_embedded_gpt2_name

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


# -- the main side ------------------------------------------------------------------------------------


@dataclass
class Summary:
    inputs: list[str]
    outputs: list[str]  # prefixes, in input order then key order
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    input_bytes: int = 0
    workers: int = 1
    encoder: str = ""
    dtype: str = ""

    def format(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"preprocessed {len(self.inputs)} input file(s) -> {len(self.outputs)} .bin/.idx pair(s) ({self.dtype})",
            f"documents {self.documents:,} | tokens {self.tokens:,} | {self.seconds:.2f} s | {rate:,.0f} tokens/s | "
            f"{self.input_bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s | workers {self.workers} | {self.encoder}",
        ]
        total_skipped = sum(self.skipped.values())
        if total_skipped:
            reasons = ", ".join(f"{reason} {count:,}" for reason, count in self.skipped.most_common())
            lines.append(f"skipped {total_skipped:,} row(s): {reasons}")
        else:
            lines.append("skipped 0 rows")
        return "\n".join(lines)


def _check_output_dir(directory: str) -> None:
    directory = directory or "."
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UserError(f"{directory}: output directory is not writable ({e.strerror or e})") from None


def _tokenizer_setup(name: str | None, hf_tokenizer: bool) -> tuple[bool, int, int | None, str]:
    """(fast_gpt2, vocab size, eos id, description) without importing transformers when not needed."""
    if is_embedded_gpt2_name(name) and not hf_tokenizer:
        return True, GPT2_VOCAB_SIZE, GPT2_EOS_ID, "tiktoken GPT-2 BPE (embedded)"
    from jaxpretrain.tokenizer import fast_encoder_for, load_tokenizer

    tokenizer = load_tokenizer(name)
    label = name or "embedded GPT-2"
    if not hf_tokenizer and fast_encoder_for(tokenizer) is not None:
        return True, len(tokenizer), tokenizer.eos_token_id, f"tiktoken GPT-2 BPE ({label})"
    return False, len(tokenizer), tokenizer.eos_token_id, f"HF tokenizer {label}"


def _pool_context():
    # fork starts workers in milliseconds, and the CLI's parent holds no threads yet (the progress bar
    # starts after the pool). A caller that has imported JAX may hold threads: fork is unsafe there.
    if sys.platform == "linux" and "jax" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Progress:
    """tqdm bar on a terminal; otherwise a plain line every `log_interval` documents (for logs)."""

    def __init__(self, total_bytes: int, log_interval: int, enabled: bool):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.documents = self.tokens = self.done_bytes = 0
        self.next_log = self.log_interval
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", dynamic_ncols=True)

    def update(self, nbytes: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.done_bytes += nbytes
        if self.bar is not None:
            self.bar.set_postfix(docs=f"{self.documents:,}", tokens=f"{self.tokens:,}", refresh=False)
            self.bar.update(nbytes)
        elif self.enabled and self.documents >= self.next_log:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(
                f"processed {self.documents:,} documents, {self.tokens:,} tokens "
                f"({self.documents / elapsed:,.0f} docs/s, {self.done_bytes / elapsed / 1e6:.1f} MB/s)",
                file=sys.stderr, flush=True,
            )
            self.next_log = (self.documents // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess_files(
    input: str | list[str],
    *,
    output_prefix: str,
    output_path: str | None = None,
    json_keys: tuple[str, ...] | list[str] = ("text",),
    input_type: str = "auto",
    text_column: str | None = None,
    append_eod: bool = False,
    workers: int = 1,
    tokenizer: str | None = None,
    hf_tokenizer: bool = False,
    log_interval: int = 1000,
    progress: bool = False,
    split_sentences: bool = False,
    keep_newlines: bool = False,
    unit_bytes: int | None = None,
) -> Summary:
    """Tokenize the files matched by `input` into `.bin/.idx` pairs; returns what was done.

    `tokenizer` is a HF name or directory (None: the embedded GPT-2). `hf_tokenizer` forces the HF
    tokenizer even where the tiktoken fast path applies. `keep_newlines` only matters with sentence
    splitting, which is not supported (as in Megatron, whole documents are the unit of pretraining data).
    """
    start_time = time.perf_counter()
    if split_sentences:
        raise UserError("--split-sentences: not supported (it needs NLTK punkt); GPT pretraining uses whole documents")
    del keep_newlines  # no effect without sentence splitting, as in Megatron
    if input_type not in ("auto", "json", "parquet"):
        raise UserError(f"--input-type: must be auto, json or parquet, got {input_type!r}")
    if workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    keys = tuple(json_keys)
    if text_column:
        keys = (text_column,)
    if not keys:
        raise UserError("--json-keys: give at least one key")

    files = resolve_inputs(input)
    out_dir = output_path if output_path else os.path.dirname(output_prefix)
    _check_output_dir(out_dir)
    fast_gpt2, vocab_size, eos_id, encoder_label = _tokenizer_setup(tokenizer, hf_tokenizer)
    if append_eod and eos_id is None:
        raise UserError(f"--append-eod: tokenizer {tokenizer!r} has no eos token")
    dtype = dtype_for_vocab(vocab_size)

    units = plan_units(files, input_type, workers, unit_bytes)
    config = WorkerConfig(keys, append_eod, eos_id, dtype.str, fast_gpt2, tokenizer, text_column)
    prefixes = {(i, key): output_prefix_for(output_prefix, output_path, i, key) for i in range(len(files)) for key in keys}
    summary = Summary(
        inputs=files, outputs=[prefixes[i, key] for i in range(len(files)) for key in keys],
        input_bytes=sum(os.path.getsize(p) for p in files), workers=workers, encoder=encoder_label, dtype=str(dtype),
    )
    units_left = Counter(unit.file_index for unit in units)
    builders: dict[tuple[int, str], IndexedDatasetBuilder] = {}
    # Inputs that gave no document wait here: if no input gives one (a wrong --json-keys, say), the run
    # fails without leaving empty output files; otherwise they are written as Megatron would.
    empty: dict[int, int] = {}
    docs_per_file = Counter()
    keys_seen = Counter()

    pool = None
    context = _pool_context() if workers > 1 and len(units) > 1 else None
    # Built once here: forked workers inherit it instead of each parsing the BPE files again.
    fast_encoder = None
    if fast_gpt2 and (context is None or context.get_start_method() == "fork"):
        from jaxpretrain.tokenizer import GPT2FastEncoder

        fast_encoder = GPT2FastEncoder()
    if context is not None:
        pool = context.Pool(min(workers, len(units)), initializer=init_worker, initargs=(config, fast_encoder))
        results = pool.imap(process_unit, units, chunksize=1)
    else:
        init_worker(config, fast_encoder)
        results = map(process_unit, units)

    bar = _Progress(sum(u.nbytes for u in units), log_interval, progress)
    try:
        for result in results:
            i = result.file_index
            for key in keys:
                if (i, key) not in builders:
                    builders[i, key] = IndexedDatasetBuilder(prefixes[i, key] + ".bin", dtype=dtype)
                builders[i, key].add_documents(result.tokens[key], result.lengths[key])
            summary.documents += result.documents
            summary.tokens += int(sum(int(t.size) for t in result.tokens.values()))
            summary.skipped.update(result.skipped)
            keys_seen.update(result.keys_seen)
            docs_per_file[i] += result.documents
            bar.update(result.nbytes, result.documents, int(result.tokens[keys[0]].size))
            units_left[i] -= 1
            if units_left[i] == 0:
                if docs_per_file[i] == 0 and summary.documents == 0:
                    empty[i] = 1
                    continue
                for j in [*empty, i]:
                    for key in keys:
                        builders.pop((j, key)).finalize(prefixes[j, key] + ".idx")
                empty.clear()
        if summary.documents == 0:
            raise UserError(_no_documents_message(keys, keys_seen, summary.skipped, files))
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start_time
    return summary


def _no_documents_message(keys, keys_seen: Counter, skipped: Counter, files: list[str]) -> str:
    where = files[0] if len(files) == 1 else f"--input ({len(files)} files)"
    missing = [r for r in skipped if r.startswith("missing key")]
    if missing and sum(skipped[r] for r in missing) == sum(skipped.values()):
        # The most frequent keys first, ties by name: the same line whatever order workers finished in.
        common = sorted(keys_seen.items(), key=lambda kv: (-kv[1], kv[0]))[:12]
        seen = ", ".join(repr(k) for k, _ in common) or "none"
        return f"{where}: no row has the key {keys[0]!r} (--json-keys); keys seen: {seen}; nothing was written"
    reasons = ", ".join(f"{r} {n:,}" for r, n in skipped.most_common()) or "the input is empty"
    return f"{where}: no usable document ({reasons}); nothing was written"


# -- CLI -----------------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpretrain.preprocess",
        description="Tokenize JSONL/parquet text into Megatron .bin/.idx files (Automodel's flags).",
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, nargs="+", help="input file glob(s), quoted; taken in sorted order")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one output per key (default: text)")
    group.add_argument("--input-type", choices=["auto", "json", "parquet"], default="auto",
                       help="json = JSON lines; auto picks parquet for .parquet/.pq files (default: auto)")
    group.add_argument("--text-column", default=None, help="column to read from parquet (overrides --json-keys)")
    group.add_argument("--split-sentences", action="store_true", help="not supported; rejected with a message")
    group.add_argument("--keep-newlines", action="store_true", help="accepted for compatibility; no effect without sentence splitting")
    group = parser.add_argument_group("tokenization")
    group.add_argument("--pretrained-model-name-or-path", default=None,
                       help="HF tokenizer name or directory (default: GPT-2, embedded, offline)")
    group.add_argument("--append-eod", action="store_true", help="append the tokenizer's eos id to every document")
    group.add_argument("--hf-tokenizer", action="store_true", help="always tokenize with HF (disable the tiktoken GPT-2 fast path)")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="output name prefix; input i writes PREFIX_i_KEY_document.bin/.idx")
    group.add_argument("--output-path", default=None, help="output directory (replaces the directory part of --output-prefix)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=_default_workers(), help="worker processes (default: usable CPUs)")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines when not on a terminal")
    group.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = preprocess_files(
        args.input,
        output_prefix=args.output_prefix,
        output_path=args.output_path,
        json_keys=args.json_keys,
        input_type=args.input_type,
        text_column=args.text_column,
        append_eod=args.append_eod,
        workers=args.workers,
        tokenizer=args.pretrained_model_name_or_path,
        hf_tokenizer=args.hf_tokenizer,
        log_interval=args.log_interval,
        progress=not args.quiet,
        split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines,
    )
    print(summary.format(), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
