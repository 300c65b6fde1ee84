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
import contextlib
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from jaxpretrain.atomic import make_writable_dir
from jaxpretrain.data.indexed import IndexedDatasetBuilder, dtype_for_vocab
from jaxpretrain.errors import UserError, run_cli
from jaxpretrain.preprocess_units import (
    WorkerConfig, init_worker, output_prefix_for, plan_units, process_unit, resolve_inputs,
)
from jaxpretrain.tokenizer import GPT2_EOS_ID, GPT2_VOCAB_SIZE, is_embedded_gpt2_name

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


def _check_output_prefix(output_prefix: str) -> None:
    # The name part is what every output file starts with: without one, they would be `_0_text_document.*`
    # (or hidden `._0_...`) files; a directory part is meaningful (it is where they go).
    if os.path.basename(output_prefix) in ("", ".", ".."):
        raise UserError(f"--output-prefix {output_prefix!r}: must end in a file name prefix, e.g. out/processed_data")


def _check_json_keys(keys: tuple[str, ...]) -> None:
    if not keys:
        raise UserError("--json-keys: give at least one key")
    # Each key names one output: a repeated key would write the same pair twice over.
    repeated = [key for key, count in Counter(keys).items() if count > 1]
    if repeated:
        raise UserError(f"--json-keys: {repeated[0]!r} is given more than once; give each key once")


@contextlib.contextmanager
def _output_dir(directory: str):
    """Create `directory` if needed and check it is writable; if that or the body fails, the
    directories this created go again (each only if still empty)."""
    directory = directory or "."
    created = []  # deepest first
    missing = os.path.abspath(directory)
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    try:
        try:
            make_writable_dir(directory)
        except OSError as e:
            raise UserError(f"{directory}: output directory is not writable ({e.strerror or e})") from None
        yield
    except BaseException:
        _remove_empty_dirs(created)
        raise


def _remove_empty_dirs(created: list[str]) -> None:
    """Undo `_output_dir` after a failed run: a directory it created goes only if still empty."""
    for directory in created:  # deepest first
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (an earlier input's finished pair) or already gone: keep it and its parents


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
    _check_json_keys(keys)
    _check_output_prefix(output_prefix)

    files = resolve_inputs(input)
    out_dir = output_path if output_path else os.path.dirname(output_prefix)
    with _output_dir(out_dir):  # a failed run leaves no empty output directory of its own making
        fast_gpt2, vocab_size, eos_id, encoder_label = _tokenizer_setup(tokenizer, hf_tokenizer)
        if append_eod and eos_id is None:
            raise UserError(f"--append-eod: tokenizer {tokenizer!r} has no eos token")
        dtype = dtype_for_vocab(vocab_size)

        units = plan_units(files, input_type, workers, unit_bytes)
        config = WorkerConfig(keys, append_eod, eos_id, dtype.str, fast_gpt2, tokenizer, text_column)
        prefixes = {
            (i, key): output_prefix_for(output_prefix, output_path, i, key) for i in range(len(files)) for key in keys
        }
        summary = Summary(
            inputs=files, outputs=[prefixes[i, key] for i in range(len(files)) for key in keys],
            input_bytes=sum(os.path.getsize(p) for p in files), workers=workers, encoder=encoder_label,
            dtype=str(dtype),
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
