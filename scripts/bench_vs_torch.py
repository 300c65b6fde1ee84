"""Ours against transformers' torch GPT-2 on the same shape, back to back in one run.

    python scripts/bench_vs_torch.py [--rounds 3] [--steps 5] [--warmup 2] [--config.x=y ...]

Each round runs `python -m jaxpretrain.bench` and `scripts/bench_torch.py` (fresh processes, the
same flags, alternating so that a change in machine load hits both) and the medians are compared.
The default shape is the CPU acceptance shape of issue 11: 4 layers x 256 wide x 8 heads, seq 256,
batch 8 (no grad accumulation), float32, the recipe's dropout 0.1. Extra `--config.*` flags override
it (both sides get them). Prints a markdown table and `speedup <X>x` last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = [
    "--config", "configs/gpt2.py",
    "--config.model.n_layer=4", "--config.model.n_embd=256", "--config.model.n_head=8",
    "--config.dataset.seq_length=256", "--config.step_scheduler.global_batch_size=8",
    "--config.step_scheduler.local_batch_size=8", "--config.model.dtype=float32",
]


def run(cmd: list[str], timeout: float) -> dict:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith('{"bench":')]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark process")
    args, extra = p.parse_known_args()
    flags = SHAPE + extra + ["--steps", str(args.steps), "--warmup", str(args.warmup), "--json"]
    ours_cmd = [sys.executable, "-m", "jaxpretrain.bench", *flags]
    torch_cmd = [sys.executable, "scripts/bench_torch.py", *flags]

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    results = {"jaxpretrain": [], "torch": []}
    for i in range(args.rounds):
        for name, cmd in (("jaxpretrain", ours_cmd), ("torch", torch_cmd)) if i % 2 == 0 else (("torch", torch_cmd), ("jaxpretrain", ours_cmd)):
            r = run(cmd, args.timeout)
            results[name].append(r)
            print(f"round {i + 1} {name}: {r['tokens_per_s']:.1f} tokens/s, step {r['step_ms']:.0f} ms "
                  f"(CPU {r['cpu_ms_per_step']:.0f} ms), loss {r['loss']:.4f}", flush=True)

    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    first = results["jaxpretrain"][0]
    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC; {machine()}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"shape: {first['params']:,} params, batch {first['global_batch']} x {first['seq']}, "
          f"grad_accum {first['grad_accum']}; {args.rounds} rounds x {args.steps} timed steps")
    print()
    print("| | tokens/s (median) | all rounds | step (median) | CPU s per step (median) | peak mem | loss |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        step = statistics.median(r["step_ms"] for r in rs)
        cpu = statistics.median(r["cpu_ms_per_step"] for r in rs) / 1000
        opts = ", ".join(f"{k} {v}" for k, v in rs[0]["options"].items())
        rounds = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs)
        print(f"| {name} ({opts}) | {med[name]:,.0f} | {rounds} | "
              f"{step:,.0f} ms | {cpu:.1f} | {max(r['peak_mem_gib'] for r in rs):.2f} GiB | {rs[0]['loss']:.4f} |")
    print()
    cpu = {k: statistics.median(r["cpu_ms_per_step"] for r in v) for k, v in results.items()}
    print(f"CPU time per step: torch / jaxpretrain = {cpu['torch'] / cpu['jaxpretrain']:.2f}x")
    print(f"speedup {med['jaxpretrain'] / med['torch']:.2f}x")


if __name__ == "__main__":
    main()
