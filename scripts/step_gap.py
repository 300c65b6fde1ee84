"""The gap between train steps in the real loop: how long the device waits for the host.

    python scripts/step_gap.py [--steps 40] [--ckpt-every 20] [--workdir /tmp/step_gap] [--config.x=y ...]

Runs the train CLI's loop (`jaxpretrain.train.loop`: loader, device prefetch, asynchronous metrics,
asynchronous Orbax checkpoints) on the embedded stdlib corpus, traced with jax.profiler, and measures
on the device timeline the idle time between the end of one train-step execution and the start of
the next: with device prefetch (the default) and without (batches put on the devices right before
their step). Checkpoint steps are shown apart: an asynchronous save still copies the state off the
devices before the next step may overwrite it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def corpus(workdir: str) -> str:
    """The stdlib corpus as Megatron token files (written once per workdir); returns the prefix glob."""
    tok = os.path.join(workdir, "tok")
    if not os.path.isdir(tok):
        env = {**os.environ, "PYTHONPATH": ROOT}
        for cmd in (
            [sys.executable, "-m", "jaxpretrain.data.stdlib_corpus", "--output", os.path.join(workdir, "jsonl")],
            [sys.executable, "-m", "jaxpretrain.preprocess", "--input", os.path.join(workdir, "jsonl", "*.jsonl"),
             "--json-keys", "text", "--output-prefix", "processed_data", "--output-path", tok, "--workers", "2", "--append-eod", "--quiet"],
        ):
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    return os.path.join(tok, "processed_data_*_text_document*")


def measure(args, extra: list[str], depth: int, tag: str) -> dict:
    import shutil

    import jax

    from jaxpretrain import parallel, profiling
    from jaxpretrain.train import report
    from jaxpretrain.train.loop import Trainer
    from jaxpretrain.train.preemption import StopSignal
    from jaxpretrain.train.prefetch import DevicePrefetcher
    from jaxpretrain.train.setup import setup
    from jaxpretrain.train.__main__ import parse_config

    run_dir = os.path.join(args.workdir, tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    glob = corpus(args.workdir)
    flags = [
        "--config", "configs/gpt2.py:tiny", f"--config.dataset.paths={glob}", f"--config.validation_dataset.paths={glob}",
        f"--config.dataset.index_mapping_dir={args.workdir}/index", f"--config.validation_dataset.index_mapping_dir={args.workdir}/index",
        f"--config.step_scheduler.max_steps={args.steps}", f"--config.step_scheduler.ckpt_every_steps={args.ckpt_every}",
        "--config.validation_dataset.num_val_samples=0",  # no validation: the gap after a save is the save's
        f"--config.step_scheduler.val_every_steps={10 * args.steps}", f"--config.checkpoint.checkpoint_dir={run_dir}/ckpt",
        f"--config.logging.log_every_steps={args.steps}", *extra,
    ]
    cfg = parse_config(flags).cfg
    parallel.initialize_distributed()
    report.setup_logging()
    trainer = Trainer(setup(cfg), StopSignal())
    trainer.batches = DevicePrefetcher(trainer.r.data_iter, trainer.r.mesh, depth=depth)
    trace = os.path.join(run_dir, "trace")
    with jax.profiler.trace(trace):
        trainer.train()
    runs = profiling.module_runs(trace, "jit_train_step")  # the train step is jitted as `train_step`
    runs = runs[-args.steps:]
    gaps = profiling.gaps_between(runs)
    ckpt_gaps = [g for k, g in enumerate(gaps, start=2) if (k - 1) % args.ckpt_every == 0]  # after a save
    plain = [g for k, g in enumerate(gaps, start=2) if (k - 1) % args.ckpt_every != 0][1:]  # skip warm-up
    steps_ms = [(b - a) / 1e6 for a, b in runs[1:]]
    return {
        "tag": tag, "step_ms": statistics.median(steps_ms), "gap_median": statistics.median(plain),
        "gap_p90": sorted(plain)[int(0.9 * (len(plain) - 1))], "gap_max": max(plain),
        "ckpt_gap": max(ckpt_gaps) if ckpt_gaps else float("nan"), "n": len(plain),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/step_gap")
    p.add_argument("--depth", type=int, default=None, help="measure this prefetch depth only (0: none)")
    args, extra = p.parse_known_args()
    os.makedirs(args.workdir, exist_ok=True)
    depths = [args.depth] if args.depth is not None else [1, 0]
    rows = [measure(args, extra, d, f"prefetch{d}") for d in depths]
    print()
    print("| loop | step (median) | gap between steps: median | p90 | max | after a checkpoint save | steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "device prefetch (default)" if r["tag"] == "prefetch1" else "no device prefetch" if r["tag"] == "prefetch0" else r["tag"]
        print(f"| {name} | {r['step_ms']:.1f} ms | {r['gap_median']:.2f} ms | {r['gap_p90']:.2f} ms | {r['gap_max']:.2f} ms | "
              f"{r['ckpt_gap']:.1f} ms | {r['n']} |")


if __name__ == "__main__":
    main()
