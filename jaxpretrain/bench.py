"""`python -m jaxpretrain.bench --config configs/gpt2.py[:preset] [--steps N] [--config.x=y ...]`.

Throughput of the real train step (the recipe's model, mesh, optimizer and gradient accumulation) on
synthetic tokens, so data preparation is not needed and the loader is not measured. Ends with a line
`<X> tokens/s`. The first steps (compilation, warm-up) are excluded from the timing.
"""

from __future__ import annotations

import sys
import time

from jaxpretrain.errors import UserError, run_cli


def bench(cfg, steps: int, warmup: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpretrain import parallel
    from jaxpretrain.train import metrics as metrics_lib
    from jaxpretrain.train import report, setup

    parallel.initialize_distributed()  # before anything starts the backend (setup_logging does)
    report.setup_logging()
    mesh = setup.make_mesh(cfg)
    plan = setup.plan_batches(cfg, parallel.data_parallel_size(mesh))
    t = setup.build_training(cfg, mesh, plan)
    seq = int(cfg.dataset.seq_length)
    rng = np.random.default_rng(0)
    local_rows = plan.global_batch_size // jax.process_count()
    tokens = rng.integers(0, t.hf_config.vocab_size, size=(local_rows, seq + 1), dtype=np.int32)
    batch = parallel.make_global_batch({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}, mesh)

    state = t.state
    for i in range(warmup):
        state, m = t.train_step(state, batch, jnp.int32(i))
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(steps):
        state, m = t.train_step(state, batch, jnp.int32(warmup + i))
    m = jax.device_get(m)
    elapsed = time.perf_counter() - start

    tps = steps * plan.global_batch_size * seq / elapsed
    fpt = t.flops_per_token(seq)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0])
    n_dev = jax.device_count()
    mfu = f"{100 * tps * fpt / (peak * n_dev):.1f}%" if peak else "n/a"
    if jax.process_index() == 0:
        print(
            f"devices {n_dev}x {jax.devices()[0].device_kind} | params {t.n_params:,} | global batch "
            f"{plan.global_batch_size} x {seq} (grad_accum {plan.grad_accum}) | step {elapsed / steps * 1000:.1f} ms | "
            f"loss {float(m['loss']):.4f} | mem {metrics_lib.peak_memory_gib():.2f} GiB | mfu {mfu} | "
            f"{tps / n_dev:.2f} tokens/s per device",
            flush=True,
        )
        print(f"{tps:.2f} tokens/s", flush=True)
    return tps


def main(argv: list[str] | None = None) -> int:
    from jaxpretrain.config.cli import Flag
    from jaxpretrain.train.__main__ import parse_config

    flags = (
        Flag("steps", int, 10, "timed steps"),
        Flag("warmup", int, 3, "untimed steps first (compilation, warm-up)"),
    )
    parsed = parse_config(
        list(sys.argv[1:] if argv is None else argv), prog="python -m jaxpretrain.bench", flags=flags,
        description="Throughput of the recipe's real train step on synthetic tokens (no data needed); ends with `<X> tokens/s`.",
    )
    bench(parsed.cfg, max(1, parsed.flags["steps"]), max(1, parsed.flags["warmup"]))
    return 0


if __name__ == "__main__":
    run_cli(main)
