"""Dataset index building and sample reads at FineWeb-Edu-10BT scale: jaxpretrain vs megatron-core.

    python scripts/bench_indices.py [--data DIR] [--repeats 3] [--reads 20000]

The data: 14 prefixes like the seed's preprocessed FineWeb-Edu 10BT (about 730k documents each, one of
182k; about 1030 tokens per document; 9.7M documents, 10B tokens). Only the `.idx` files are real; each
`.bin` is a sparse file of the right size (the indices need only the lengths; reads return zeros).

Index building: the seed's call, sizes [9472000, 37888, None], split "0.99, 0.01, 0.00", seq 1024,
seed 1234, the glob of all 14 prefixes, a fresh cache directory each time (so both write their cache).
Each run is a fresh process: megatron-core's `BlendedMegatronDatasetBuilder(GPTDataset, ...).build()`
(its C++ helpers) and our `build_gpt_datasets`. Reported: the build call's wall time, the whole process
(imports included), and peak RSS (`ru_maxrss`, the process and its children). The two caches are
compared file by file.

Reads (one process pinned to one core; each timed pass follows an untimed one over the same samples,
so the page cache holds them: first reads of sparse-file holes cost a page fault each on this VM and
would measure the disk, not the code): random single samples `ds[i]`, random batches of 512 through
`get_batch`, and the Grain loader at global batch 512 (seq 1024), with and without its prefetch thread.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [9472000, 37888, None]
SPLIT = "0.99, 0.01, 0.00"
SEQ = 1024
NUM_PREFIXES = 14


def make_data(directory: str) -> str:
    """The synthetic FineWeb-Edu-10BT `.idx` files with sparse `.bin`s; returns the glob."""
    os.makedirs(directory, exist_ok=True)
    pattern = os.path.join(directory, "fineweb_edu_*_text_document.*")
    done = os.path.join(directory, "DONE")
    if os.path.exists(done):
        return pattern
    rng = np.random.default_rng(1234)
    for i in range(NUM_PREFIXES):
        docs = 182_000 if i == NUM_PREFIXES - 1 else int(rng.integers(720_000, 740_000))
        lengths = rng.lognormal(mean=6.5, sigma=0.9, size=docs)
        lengths = np.maximum(1, lengths * (1030.0 / lengths.mean())).astype(np.int32)
        prefix = os.path.join(directory, f"fineweb_edu_{i}_text_document")
        pointers = np.zeros(docs, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
        with open(prefix + ".idx", "wb") as f:  # Megatron's .idx, uint16 tokens (dtype code 8)
            f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, docs, docs + 1))
            f.write(lengths.tobytes() + pointers.tobytes() + np.arange(docs + 1, dtype=np.int64).tobytes())
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
    open(done, "w").close()
    return pattern


_MEGATRON = r"""
import glob, json, resource, socket, sys, time, warnings
t0 = time.perf_counter()
warnings.simplefilter("ignore")
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
class Tokenizer:
    eod, pad, vocab_size = 50256, -1, 50257
    unique_identifiers = {"class": "bench"}
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
prefixes = sorted({p.rsplit(".", 1)[0] for p in glob.glob(PATTERN)})
config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, blend=(prefixes, None), split=SPLIT,
    path_to_cache=CACHE, tokenizer=Tokenizer(), reset_position_ids=False, reset_attention_mask=False,
    eod_mask_loss=False, create_attention_mask=False)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
datasets = BlendedMegatronDatasetBuilder(GPTDataset, SIZES, lambda: True, config).build()
t2 = time.perf_counter()
print(json.dumps({"build_s": t2 - t1, "process_s": t2 - t0, "rss_after_imports_mb": rss_before / 1024,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "lengths": [None if d is None else len(d) for d in datasets]}))
"""

_OURS = r"""
import json, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, ROOT)
from jaxpretrain.data import build_gpt_datasets
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
datasets = build_gpt_datasets(PATTERN, seq_length=SEQ, split=SPLIT, seed=1234, num_samples=SIZES,
    cache_dir=CACHE, tokenizer={"class": "bench"}, background_blend=BACKGROUND)
t2 = time.perf_counter()
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"build_s": t2 - t1, "process_s": t2 - t0, "rss_after_imports_mb": rss_before / 1024,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "child_peak_rss_mb": children,
    "lengths": [None if d is None else len(d) for d in datasets]}))
"""

_READS = r"""
import json, os, sys, time
sys.path.insert(0, ROOT)
os.sched_setaffinity(0, {CPU})
import numpy as np
from jaxpretrain.data import build_gpt_datasets
from jaxpretrain.data.loader import make_loader
train = build_gpt_datasets(PATTERN, seq_length=SEQ, split=SPLIT, seed=1234, num_samples=SIZES, cache_dir=CACHE,
    tokenizer={"class": "bench"})[0]
rng = np.random.default_rng(0)
picks = rng.integers(0, len(train), READS)
batches = [rng.integers(0, len(train), 512) for _ in range(40)]
def timed(fn):
    fn()  # first pass: pull the touched pages into the page cache (sparse .bin holes fault slowly)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
single = READS / timed(lambda: [train[int(i)] for i in picks])
batch = 40 * 512 / timed(lambda: [train.get_batch(b) for b in batches])
def loader_rate(n, **kw):
    def go():
        it = iter(make_loader(train, global_batch_size=512, num_batches=n, **kw))
        next(it)
        t = time.perf_counter()
        for _ in range(n - 1):
            next(it)
        return time.perf_counter() - t
    go()
    return (n - 1) / go()
print(json.dumps({"single_samples_per_s": single, "batch_samples_per_s": batch,
    "loader_batches_per_s": loader_rate(100),
    "loader_batches_per_s_no_prefetch": loader_rate(100, prefetch_buffer_size=0)}))
"""


def run(script: str, env_extra=None, **values) -> dict:
    for name, value in values.items():
        script = script.replace(name, repr(value))
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_cache(a: str, b: str) -> bool:
    files = lambda d: sorted(f for f in os.listdir(d) if f.endswith((".npy", ".txt")))
    same = lambda f: filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
    return files(a) == files(b) and all(same(f) for f in files(a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "jaxpretrain_bench_fineweb"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reads", type=int, default=20000)
    args = parser.parse_args()

    pattern = make_data(args.data)
    work = tempfile.mkdtemp(prefix="bench_indices_")
    common = dict(PATTERN=pattern, SEQ=SEQ, SPLIT=SPLIT, SIZES=SIZES)
    rows = {"megatron-core (C++ helpers)": [], "jaxpretrain": [], "jaxpretrain, blend not in its own thread": []}
    identical = None
    try:
        for r in range(args.repeats):  # interleaved, so outside load hits both alike
            mega_cache, ours_cache, bg_cache = (os.path.join(work, f"{name}{r}") for name in ("mega", "ours", "bg"))
            rows["megatron-core (C++ helpers)"].append(run(_MEGATRON, CACHE=mega_cache, **common))
            rows["jaxpretrain"].append(run(_OURS, CACHE=ours_cache, ROOT=ROOT, BACKGROUND=True, **common))
            rows["jaxpretrain, blend not in its own thread"].append(
                run(_OURS, CACHE=bg_cache, ROOT=ROOT, BACKGROUND=False, **common))
            if identical is None:
                identical = same_cache(mega_cache, ours_cache) and same_cache(mega_cache, bg_cache)
            keep = ours_cache
            for d in (mega_cache, bg_cache):
                shutil.rmtree(d, ignore_errors=True)
            if r < args.repeats - 1:
                shutil.rmtree(ours_cache, ignore_errors=True)
        reads = run(_READS, CACHE=keep, ROOT=ROOT, CPU=sorted(os.sched_getaffinity(0))[0], READS=args.reads, **common)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cpus, load average {os.getloadavg()[0]:.2f}")
    print(f"caches identical file by file (names and bytes): {identical}")
    mega_lengths = rows["megatron-core (C++ helpers)"][0]["lengths"]
    print(f"lengths: {rows['jaxpretrain'][0]['lengths']} (megatron-core: {mega_lengths})")
    print("| | build (median) | all runs | whole process (median) | peak RSS | RSS after imports |")
    print("|---|---|---|---|---|---|")
    for name, results in rows.items():
        build = [x["build_s"] for x in results]
        process = [x["process_s"] for x in results]
        rss = max(x["peak_rss_mb"] for x in results)
        child = max(x.get("child_peak_rss_mb", 0) for x in results)
        rss_text = f"{rss:.0f} MB" + (f" + child {child:.0f} MB" if child > 10 else "")
        base = max(x["rss_after_imports_mb"] for x in results)
        print(f"| {name} | {np.median(build):.2f} s | {', '.join(f'{b:.2f}' for b in build)} | "
              f"{np.median(process):.2f} s | {rss_text} | {base:.0f} MB |")
    print(f"random single samples, one core: {reads['single_samples_per_s']:,.0f} samples/s")
    print(f"random batches of 512 (get_batch), one core: {reads['batch_samples_per_s']:,.0f} samples/s")
    print(f"loader, G=512 seq 1024, one core: {reads['loader_batches_per_s']:.1f} batches/s with prefetch, "
          f"{reads['loader_batches_per_s_no_prefetch']:.1f} without")


if __name__ == "__main__":
    main()
