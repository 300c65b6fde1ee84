"""How long the out-of-vocabulary check costs: one pass over a `.bin`, then the remembered result.

    python scripts/bench_token_check.py --tokens 500_000_000 [--dir /tmp/tokcheck] [--prefix P]

Writes a uint16 file of random GPT-2 ids (or takes an existing prefix), then times
`vocab_check.token_range` three ways: the scan itself (file in the page cache, so this is the CPU
cost; a cold disk adds its read time), with a cache directory (scan + record), and the cached lookup.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from jaxpretrain.data import vocab_check
from jaxpretrain.data.indexed import IndexedDataset, IndexedDatasetBuilder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=500_000_000)
    p.add_argument("--dir", default=None, help="where to write the synthetic file (default: a temp dir)")
    p.add_argument("--prefix", default=None, help="an existing .bin/.idx prefix instead of a synthetic file")
    args = p.parse_args()
    workdir = args.dir or tempfile.mkdtemp(prefix="tokcheck-")
    os.makedirs(workdir, exist_ok=True)
    prefix = args.prefix
    if prefix is None:
        prefix = os.path.join(workdir, "synthetic_text_document")
        rng = np.random.default_rng(0)
        chunk, left = 50_000_000, args.tokens
        with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
            while left:
                n = min(chunk, left)
                builder.add_documents(rng.integers(0, 50257, n, dtype=np.uint16), [n // 1000] * 999 + [n - 999 * (n // 1000)])
                left -= n
            builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    size_gb = os.path.getsize(ds.bin_path) / 1e9
    cache = os.path.join(workdir, "cache")
    shutil.rmtree(cache, ignore_errors=True)

    t = time.perf_counter()
    found = vocab_check.token_range(ds)
    scan = time.perf_counter() - t
    t = time.perf_counter()
    vocab_check.token_range(ds, cache)
    first = time.perf_counter() - t
    t = time.perf_counter()
    vocab_check.token_range(IndexedDataset(prefix), cache)
    cached = time.perf_counter() - t
    tokens = os.path.getsize(ds.bin_path) // ds.dtype.itemsize
    print(f"{tokens:,} tokens ({ds.dtype}, {size_gb:.2f} GB), ids {found[0]}..{found[1]}")
    print(f"scan {scan:.2f} s ({tokens / scan / 1e9:.2f} G tokens/s, {size_gb / scan:.2f} GB/s); "
          f"scan + record {first:.2f} s; remembered {cached * 1e3:.2f} ms")
    if args.prefix is None and args.dir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
