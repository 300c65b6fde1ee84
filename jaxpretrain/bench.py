"""`python -m jaxpretrain.bench --config configs/gpt2.py[:preset] [bench flags] [--config.x=y ...]`.

Throughput of the real train step (the recipe's model, mesh, optimizer and gradient accumulation,
one jitted program) on synthetic tokens, so no data preparation is needed and the loader is not
measured. Reported:

  compile   the first step's lower + compile, timed apart (ahead of time, nothing executed)
  step      wall time per optimizer step over --steps steps, after --warmup executed steps
  tokens/s  global batch x seq / step, in total and per device
  MFU       tokens/s x flops_per_token / (devices x the device's dense bf16 peak), with
            flops_per_token = 6N + 12 L H Q T (nanoGPT's estimate: N parameters without the
            position embeddings, L layers, H heads, Q head size, T sequence length)
  memory    peak device memory (CPU: the process's peak RSS) and XLA's temp buffers for the step

The last line is `<X> tokens/s`. With `--json` the same figures go to stdout as one JSON line
(starting `{"bench":`) just before it. `--profile DIR` traces a few more steps with jax.profiler
and prints the top XLA ops by time as a markdown table; if tracing or its summary fails, a
`warning: --profile:` line says why and the figures are reported all the same (`profile_error`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from jaxpretrain.errors import UserError, run_cli

MFU_FORMULA = "mfu = tokens/s x flops_per_token / (devices x peak bf16 FLOP/s); flops_per_token = 6N + 12*L*H*Q*T"


def bench_flags():
    """Bench's own flags (beside --config and --config.a.b=v), for the shared CLI layer."""
    from jaxpretrain.config.cli import Flag

    return (
        Flag("steps", int, 10, "timed optimizer steps"),
        Flag("warmup", int, 2, "executed steps before timing, after the compile"),
        Flag("json", bool, False, 'also print the figures as one JSON line (starts {"bench":) before the last line'),
        Flag("profile", str, None, "trace --profile-steps more steps into this directory and print the top XLA ops"),
        Flag("profile-steps", int, 3, "steps traced with --profile"),
        Flag("top", int, 15, "ops listed with --profile"),
    )


DESCRIPTION = (
    "Throughput of the recipe's real train step on synthetic tokens (no data needed): compile time, step time,\n"
    "tokens/s in total and per device, MFU, peak memory; ends with `<X> tokens/s`."
)


# ------------------------------------------------------------------------------------------------
# Report (shared with scripts/bench_torch.py, so both print the same fields)
# ------------------------------------------------------------------------------------------------


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    return tokens_per_s * flops_per_token / (n_devices * peak) if peak else None


def format_report(r: dict) -> list[str]:
    """Human lines for a result dict (see `bench`), ending with the `<X> tokens/s` line."""
    opts = " ".join(f"{k} {v}" for k, v in r["options"].items())
    if r.get("attention_kernels"):  # scripts/bench_torch.py reports none
        opts += " (kernels " + "+".join(r["attention_kernels"]) + ")"
    mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (peak unknown)"
    return [
        f"bench {r['bench']} | {r['devices']}x {r['device_kind']} | params {r['params']:,} | batch "
        f"{r['global_batch']} x {r['seq']} (micro-batch {r['micro_batch']}, grad_accum {r['grad_accum']}) | {opts}",
        f"compile {r['compile_s']:.1f} s | step {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} tokens/s "
        f"({r['tokens_per_s_per_device']:,.0f} per device) | mfu {mfu_text} | mem {r['peak_mem_gib']:.2f} GiB"
        + (f" (XLA temp {r['temp_gib']:.2f} GiB)" if r.get("temp_gib") is not None else "")
        + f" | loss {r['loss']:.4f}",
        f"{MFU_FORMULA}; flops_per_token {r['flops_per_token'] / 1e6:.1f} M",
    ]


def print_report(r: dict, as_json: bool) -> None:
    for line in format_report(r):
        print(line, flush=True)
    if as_json:
        print(json.dumps(r), flush=True)
    print(f"{r['tokens_per_s']:.2f} tokens/s", flush=True)


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------


def _options(cfg) -> dict:
    """The speed-relevant settings, as printed and recorded."""
    m = cfg.model
    dropout = m.get("dropout")
    out = {
        "dtype": m.get("dtype"),
        "dropout": "hf" if dropout is None else dropout,
        "remat": (m.get("remat_policy") or True) if m.get("remat") else False,
        "attention": m.get("attention_impl") or "auto",
    }
    for section, key, name in (("model", "scan_layers", "scan"), ("loss_fn", "chunk_size", "loss_chunk")):
        if key in cfg[section]:
            out[name] = cfg[section][key]
    return out


def _attention_kernels(compiled) -> list[str] | None:
    """The cuDNN attention kernels (forward) that the optimized step calls, by custom-call name;
    ["xla"] when it calls none (XLA's own attention), None when the backend gives no HLO text. So a
    quiet fallback (a jax without cuDNN's dropout kernel, say) shows in the report."""
    try:
        hlo = compiled.as_text()
    except Exception:  # noqa: BLE001 - a report detail: never fail the benchmark over it
        return None
    return sorted({k for k in re.findall(r"__cudnn\$(fmha\w*)", hlo or "") if "Backward" not in k}) or ["xla"]


def bench(cfg, args) -> dict:
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

    # -- Compile, ahead of time and timed apart.
    start = time.perf_counter()
    lowered = t.train_step.lower(state, batch, jnp.int32(0))
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    numbers = t.train_step.numbers

    def run_step(state, step: int):  # the compiled step also takes the schedules' numbers (train/step.py)
        return compiled(state, batch, jnp.int32(step), numbers)

    attention_kernels = _attention_kernels(compiled)
    temp_gib = None
    try:
        temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
    except Exception:  # not every backend reports it
        pass

    # -- Warm-up, then the timed steps (the host never waits inside them).
    step = 0
    for _ in range(max(args.warmup, 0)):
        state, m = run_step(state, step)
        step += 1
    jax.block_until_ready(state)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        state, m = run_step(state, step)
        step += 1
    m = jax.device_get(m)
    jax.block_until_ready(state)
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    n_dev = jax.device_count()
    tps = args.steps * plan.global_batch_size * seq / elapsed
    fpt = t.flops_per_token(seq)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0])
    result = {
        "bench": "jaxpretrain",
        "device_kind": jax.devices()[0].device_kind,
        "devices": n_dev,
        "params": int(t.n_params),
        "global_batch": plan.global_batch_size,
        "micro_batch": plan.local_batch_size,
        "grad_accum": plan.grad_accum,
        "seq": seq,
        "options": _options(cfg),
        "attention_kernels": attention_kernels,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "steps": args.steps,
        "step_ms": 1000 * elapsed / args.steps,
        # CPU seconds of this process per step (all threads): on a shared CPU host, steadier than wall time.
        "cpu_ms_per_step": 1000 * cpu_s / args.steps,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps / n_dev,
        "flops_per_token": fpt,
        "mfu": mfu(tps, fpt, n_dev, peak),
        "peak_mem_gib": metrics_lib.peak_memory_gib(),
        "temp_gib": temp_gib,
        "loss": float(m["loss"]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # as the backend saw them (after xla_env.configure)
    }

    if args.profile:
        try:
            _profile(run_step, state, step, args, result)
        except Exception as e:  # noqa: BLE001 - a profiler that fails loses its table, never the timings above
            # (the tracer is the part most tied to the machine: CUPTI, a trace layout a new jax changed)
            result["profile_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(f"warning: --profile: {result['profile_error']}; the timings stand", file=sys.stderr, flush=True)
    return result


def _profile(run_step, state, step: int, args, result: dict) -> None:
    """Trace `args.profile_steps` more steps into `args.profile`; their top ops go into `result`."""
    import jax

    from jaxpretrain import profiling

    jax.block_until_ready(state)
    with jax.profiler.trace(args.profile):
        for _ in range(args.profile_steps):
            state, _ = run_step(state, step)
            step += 1
        jax.block_until_ready(state)
    ops, total_ms = profiling.top_ops(args.profile, top=args.top)
    result["profile_dir"] = args.profile
    result["profile_top_ops"] = [dict(name=o.name, kind=o.category, ms_per_step=o.total_ms / args.profile_steps, share=o.share) for o in ops]
    if jax.process_index() == 0:
        print(profiling.format_top_ops(ops, total_ms, args.profile_steps, profiling.by_category(args.profile)), flush=True)


def main(argv: list[str] | None = None) -> int:
    from jaxpretrain import xla_env
    from jaxpretrain.train.__main__ import parse_config

    parsed = parse_config(
        list(sys.argv[1:] if argv is None else argv), prog="python -m jaxpretrain.bench", flags=bench_flags(),
        description=DESCRIPTION,
    )
    args = argparse_like(parsed.flags)
    xla_env.configure()  # before jax starts its backend
    result = bench(parsed.cfg, args)
    import jax

    if jax.process_index() == 0:
        print_report(result, args.json)
    return 0


def argparse_like(flags: dict):
    """The parsed flags as attributes, checked."""
    import types

    for name in ("steps", "profile_steps", "top"):
        if flags[name] < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be at least 1")
    if flags["warmup"] < 0:
        raise UserError("--warmup: must be 0 or more")
    if flags.get("profile") is not None:  # scripts/bench_torch.py has no --profile
        _check_profile_dir(flags["profile"])
    return types.SimpleNamespace(**flags)


def _check_profile_dir(directory: str) -> None:
    # jax.profiler only writes the trace when it stops, after the whole benchmark: a directory it
    # cannot write must fail here, before minutes of compiling and stepping are thrown away.
    from jaxpretrain.atomic import make_writable_dir

    try:
        make_writable_dir(directory)
    except OSError as e:
        raise UserError(f"--profile {directory}: cannot write the trace there ({e.strerror or e})") from None


if __name__ == "__main__":
    run_cli(main)
