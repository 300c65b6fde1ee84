"""Benchmark: `python -m jaxpretrain.preprocess --workers N` vs the reference single-process pass.

The reference is Automodel's/Megatron's loop without its pool: one process, HF GPT-2 `tokenizer(text)`
per document, megatron-core's `IndexedDatasetBuilder.add_document`. Both read the same JSONL (CPython's
standard library sources, ~33 MB) and must write byte-identical files, which is checked.

Timing is kind to the reference: its figure is the loop only (after imports and tokenizer load), while
ours is the whole CLI as a user runs it (interpreter start, imports, pool start, writing). Runs alternate
and repeat; medians are reported. On a shared machine rerun and compare: other load skews both sides.

    python scripts/bench_preprocess.py [--workers 2] [--repeats 3] [--write-doc docs/performance.md]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Preprocessing"

# The reference pass, run in its own interpreter so that neither side warms the other's caches.
BASELINE = r"""
import glob, json, os, sys, time
import torch  # megatron-core needs it
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from jaxpretrain.tokenizer import load_tokenizer

inputs, out_dir = sorted(glob.glob(sys.argv[1])), sys.argv[2]
tokenizer = load_tokenizer()  # the embedded GPT-2 = openai-community/gpt2
start = time.perf_counter()
tokens = 0
for i, path in enumerate(inputs):
    prefix = os.path.join(out_dir, f"processed_data_{i}_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(tokenizer)))
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"]).input_ids + [tokenizer.eos_token_id]
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
print(f"BASELINE {time.perf_counter() - start:.3f} {tokens}")
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TOKENIZERS_PARALLELISM"] = "false"  # the reference is single-process, single-thread
    return env


def run_baseline(pattern: str, out_dir: str) -> tuple[float, float, int]:
    """(loop seconds, whole-process seconds, tokens)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BASELINE, pattern, out_dir], capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"baseline failed:\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("BASELINE "))
    _, seconds, tokens = line.split()
    return float(seconds), wall, int(tokens)


def ours_command(pattern: str, out_dir: str, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "jaxpretrain.preprocess", "--input", pattern, "--json-keys", "text",
        "--output-prefix", "processed_data", "--output-path", out_dir, "--workers", str(workers), "--append-eod", "--quiet",
    ]


def run_ours(pattern: str, out_dir: str, workers: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(ours_command(pattern, out_dir, workers), capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"jaxpretrain.preprocess failed:\n{proc.stderr}")
    return wall


def same_outputs(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return f"{len(os.sched_getaffinity(0))} cores, {model}"


def write_section(doc_path: str, text: str) -> None:
    """Replace (or append) this benchmark's section, leaving the other sections of the file alone."""
    existing = open(doc_path, encoding="utf-8").read() if os.path.exists(doc_path) else "# Performance\n"
    lines = existing.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.strip() == SECTION), None)
    if start is None:
        new = existing.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    os.makedirs(os.path.dirname(os.path.abspath(doc_path)), exist_ok=True)
    with open(doc_path, "w", encoding="utf-8") as f:
        f.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-files", type=int, default=4, help="JSONL chunks the corpus is split into")
    parser.add_argument("--write-doc", default=None, help="update the '## Preprocessing' section of this file")
    args = parser.parse_args()

    sys.path.insert(0, REPO_ROOT)
    from jaxpretrain.data.stdlib_corpus import write_stdlib_jsonl

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_preprocess.") as tmp:
        paths = write_stdlib_jsonl(os.path.join(tmp, "jsonl"), num_files=args.num_files)
        pattern = os.path.join(tmp, "jsonl", "*.jsonl")
        corpus_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"corpus: {len(paths)} files, {corpus_mb:.1f} MB (CPython {platform.python_version()} stdlib sources)")

        base_loop, base_wall, ours = [], [], []
        tokens = 0
        for r in range(args.repeats):
            # Alternate which side goes first, so a burst of outside load does not always hit the same one.
            order = ("ours", "base") if r % 2 else ("base", "ours")
            for side in order:
                out = os.path.join(tmp, f"{side}{r}")
                os.makedirs(out)
                if side == "base":
                    loop, wall, tokens = run_baseline(pattern, out)
                    base_loop.append(loop)
                    base_wall.append(wall)
                    print(f"  run {r}: reference loop {loop:.2f} s (process {wall:.2f} s)")
                else:
                    ours.append(run_ours(pattern, out, args.workers))
                    print(f"  run {r}: jaxpretrain.preprocess --workers {args.workers}: {ours[-1]:.2f} s")
            if not same_outputs(os.path.join(tmp, f"base{r}"), os.path.join(tmp, f"ours{r}")):
                sys.exit("outputs differ from the reference: the benchmark is void")

    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    b_loop, b_wall, o = statistics.median(base_loop), statistics.median(base_wall), statistics.median(ours)
    speedup = b_loop / o
    summary = (
        f"tokens {tokens:,}; reference loop {b_loop:.2f} s ({tokens / b_loop / 1e6:.2f} M tokens/s; whole process "
        f"{b_wall:.2f} s); ours {o:.2f} s ({tokens / o / 1e6:.2f} M tokens/s); speedup {speedup:.1f}x "
        f"(loop vs our whole CLI), {b_wall / o:.1f}x process vs process; {load}"
    )
    print(summary)
    if args.write_doc:
        date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        cmd = " ".join(ours_command("'DATA/*.jsonl'", "OUT", args.workers)[1:])
        text = (
            f"{SECTION}\n\n"
            f"`scripts/bench_preprocess.py --workers {args.workers} --repeats {args.repeats}` ({date}; {machine()}; "
            f"Python {platform.python_version()}). Corpus: CPython's stdlib sources as JSONL, {len(paths)} files, "
            f"{corpus_mb:.1f} MB, {tokens:,} GPT-2 tokens with eos.\n\n"
            f"- Reference: one process, HF GPT-2 `tokenizer(text).input_ids + [eos]` per document into megatron-core's "
            f"`IndexedDatasetBuilder` (Automodel's loop without its pool). Timed: the loop only, after imports.\n"
            f"- Ours: `python {cmd}`. Timed: the whole command (interpreter start, imports, pool, writing).\n"
            f"- Outputs checked byte-identical on every run.\n\n"
            f"| | median of {args.repeats} | tokens/s |\n|---|---|---|\n"
            f"| reference loop | {b_loop:.2f} s | {tokens / b_loop / 1e6:.2f} M |\n"
            f"| reference, whole process | {b_wall:.2f} s | {tokens / b_wall / 1e6:.2f} M |\n"
            f"| jaxpretrain.preprocess, {args.workers} workers | {o:.2f} s | {tokens / o / 1e6:.2f} M |\n\n"
            f"Speedup {speedup:.1f}x (reference loop vs our whole CLI; {b_wall / o:.1f}x process vs process). "
            f"Where it comes from: tiktoken's GPT-2 BPE (same ids as HF, proven in tests/test_tokenizer.py) instead of "
            f"one HF call per document, whole units of documents written as numpy arrays, and the work cut into byte "
            f"ranges so both workers stay busy. The machine was shared with other jobs while measuring ({load}); "
            f"figures are medians and vary by run, and outside load slows our two workers more than the "
            f"one-process reference.\n"
        )
        write_section(args.write_doc, text)
        print(f"wrote {SECTION!r} in {args.write_doc}")


if __name__ == "__main__":
    main()
