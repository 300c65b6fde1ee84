"""XLA's memory plan and compile time of the real train step, ahead of time (nothing is executed).

    python scripts/bench_memory.py [--config configs/gpt2.py] [--config.x=y ...] [--variants NAME ...]

Compiles the recipe's train step (jaxpretrain.train.setup.build_training, one micro-batch per step)
for each variant and prints XLA's buffer plan from `compiled.memory_analysis()`: temporaries (the
activations, logits, gradients in flight), arguments (parameters, AdamW state, batch) and outputs.
On CPU this is XLA:CPU's plan, not a GPU's; what the chunked loss and the layer scan change in it
carries over. Variants: plain (the plain loss, unrolled blocks), chunked (loss_fn.chunk_size 128),
scan (chunked + model.scan_layers), remat (scan + remat with dots_with_no_batch_dims_saveable).
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "plain": ["--config.loss_fn.chunk_size=0"],
    "chunked": ["--config.loss_fn.chunk_size=128"],
    "scan": ["--config.loss_fn.chunk_size=128", "--config.model.scan_layers=true"],
    "remat": ["--config.loss_fn.chunk_size=128", "--config.model.scan_layers=true", "--config.model.remat=true",
              "--config.model.remat_policy=dots_with_no_batch_dims_saveable"],
}


def measure(flags: list[str]) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxpretrain import parallel
    from jaxpretrain.train import setup
    from jaxpretrain.train.__main__ import parse_config

    cfg = parse_config(flags).cfg
    mesh = setup.make_mesh(cfg)
    plan = setup.plan_batches(cfg, parallel.data_parallel_size(mesh))
    t = setup.build_training(cfg, mesh, plan)
    seq = int(cfg.dataset.seq_length)
    batch = {k: jax.ShapeDtypeStruct((plan.global_batch_size, seq), jnp.int32, sharding=parallel.batch_sharding(mesh))
             for k in ("input_ids", "labels")}
    start = time.perf_counter()
    compiled = t.train_step.lower(t.state, batch, jnp.int32(0)).compile()
    m = compiled.memory_analysis()
    return {"compile_s": time.perf_counter() - start, "temp": m.temp_size_in_bytes, "args": m.argument_size_in_bytes,
            "out": m.output_size_in_bytes, "micro": plan.local_batch_size, "seq": seq}


def main() -> None:
    argv = sys.argv[1:]
    names = list(VARIANTS)
    if "--variants" in argv:
        i = argv.index("--variants")
        names = [a for a in argv[i + 1:] if not a.startswith("--")]
        argv = argv[:i] + [a for a in argv[i + 1:] if a.startswith("--")]
    if "--config" not in argv:
        argv = ["--config", "configs/gpt2.py", *argv]
    # One micro-batch per step unless told otherwise: the plan of a micro-batch is what memory is about.
    if not any(a.startswith("--config.step_scheduler.global_batch_size") for a in argv):
        argv += ["--config.step_scheduler.global_batch_size=32", "--config.step_scheduler.local_batch_size=32"]
    rows = [(name, measure(argv + VARIANTS[name])) for name in names]
    gib = 2**30
    print()
    print(f"| variant | compile | XLA temporaries | arguments | outputs |  (micro-batch {rows[0][1]['micro']} x {rows[0][1]['seq']})")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['compile_s']:.1f} s | {r['temp'] / gib:.2f} GiB | {r['args'] / gib:.2f} GiB | {r['out'] / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
