"""Loader throughput of one process, as the train loop consumes it: Grain loader + device prefetch.

    python scripts/bench_loader.py [--batches 200] [--global-batch 512] [--seq 1024] [--workdir /tmp/bench_loader]

Reads the embedded stdlib corpus as Megatron token files (written once into --workdir) through
`build_gpt_datasets` and `make_loader` (Megatron sampler order, one prefetch thread), and hands each
batch to the devices with `DevicePrefetcher` (global jax.Arrays), as `jaxpretrain.train.loop` does.
Prints tokens/s next to what 8 GPUs at issue 11's 550,000 tokens/s each consume (4.4M tokens/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

EIGHT_GPUS = 8 * 550_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--workdir", default="/tmp/bench_loader")
    p.add_argument("--workers", type=int, default=0, help="Grain worker processes (0: one reader thread)")
    args = p.parse_args()

    import jax

    from jaxpretrain import parallel
    from jaxpretrain.data import build_gpt_datasets
    from jaxpretrain.data.loader import make_loader
    from jaxpretrain.train.prefetch import DevicePrefetcher
    from step_gap import corpus

    glob = corpus(args.workdir)
    n = args.batches * args.global_batch
    train = build_gpt_datasets(glob, seq_length=args.seq, split="1, 0, 0", seed=1234, num_samples=(n, 0, 0),
                               cache_dir=os.path.join(args.workdir, f"index_{args.seq}"))[0]
    mesh = parallel.make_mesh()
    loader = make_loader(train, global_batch_size=args.global_batch, num_batches=args.batches, worker_count=args.workers, repeat=True)
    batches = DevicePrefetcher(iter(loader), mesh)
    first = next(batches)  # the reader thread's start-up is not counted
    jax.block_until_ready(first)
    start, cpu = time.perf_counter(), time.process_time()
    count = 0
    for batch in batches:
        jax.block_until_ready(batch)
        count += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = count * args.global_batch * args.seq
    tps = tokens / elapsed
    print(f"{count} batches of {args.global_batch} x {args.seq} in {elapsed:.2f} s ({cpu:.2f} CPU s): "
          f"{count / elapsed:.1f} batches/s, {tps / 1e6:.1f}M tokens/s per process = "
          f"{tps / EIGHT_GPUS:.0f}x what 8 GPUs at 550,000 tokens/s consume (4.4M tokens/s)")


if __name__ == "__main__":
    main()
