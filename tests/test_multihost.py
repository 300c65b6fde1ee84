"""Several devices per process, as on GPU nodes (one process per node driving all its GPUs), with real
processes on CPU (gloo): no start-up deadlock however many small cross-process programs are in
flight; two processes of two devices train like one process of four (data and tensor parallel); a
checkpoint moves to another process count and mesh; a killed or frozen process ends its peer."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import textwrap
import time

import numpy as np
import pytest

from test_multiprocess_train import Processes, losses_of
from test_train import as_flags, tiny_overrides

STEPS, CKPT_AT = 6, 3
GLOBAL = 8
# Layouts: (processes, devices per process, tp_size, local batch). Every layout has grad accumulation 1
# (local x dp = 8), so micro-batches, and with them the dropout masks, are the same rows everywhere.
LAYOUTS = {
    "1x4": (1, 4, 1, 2),
    "2x2": (2, 2, 1, 2),
    "2x2_tp2": (2, 2, 2, 4),
    "1x4_tp2": (1, 4, 2, 4),
}

# The hazard itself, without a model: 64 independent cross-process reductions dispatched back to back
# (more than the CPU client's 32 in-flight programs per device), then read, five times over. Before
# jaxpretrain.processes sized the CPU thread pool, this hung in every start on 2 cores.
BURST = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxpretrain import processes
    processes.initialize_distributed()
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    n = jax.local_device_count()
    xs = [jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full((n, 8), i, np.float32)) for i in range(64)]
    total = jax.jit(jnp.sum)
    for rep in range(5):
        got = sum(float(v) for v in [total(x) for x in xs])
        assert got == 8 * jax.device_count() * sum(range(64)), got
    print("burst done", flush=True)
    """
)


def overrides(token_glob: str, ckpt: str, layout: str, **extra) -> dict:
    _, _, tp, local = LAYOUTS[layout]
    return tiny_overrides(token_glob, ckpt, **{
        "step_scheduler.max_steps": STEPS, "step_scheduler.ckpt_every_steps": CKPT_AT, "step_scheduler.val_every_steps": STEPS,
        "step_scheduler.global_batch_size": GLOBAL, "step_scheduler.local_batch_size": local, "distributed.tp_size": tp,
        **extra,
    })


def start(stack, token_glob: str, work: str, name: str, layout: str, ckpt: str | None = None, **extra) -> Processes:
    n, devices, _, _ = LAYOUTS[layout]
    ckpt = ckpt or os.path.join(work, name, "ckpt")
    return stack.enter_context(Processes(as_flags(overrides(token_glob, ckpt, layout, **extra)), os.path.join(work, name), n, devices=devices))


def test_many_small_cross_process_programs_never_deadlock(tmp_path):
    """Three starts of two processes with two devices each, each bounded in time."""
    for attempt in range(3):
        with Processes([], str(tmp_path / f"start{attempt}"), n=2, devices=2, argv=["-c", BURST], timeout=120) as p:
            outs = p.wait()
        assert all("burst done" in out for out in outs), outs


@pytest.fixture(scope="module")
def layouts(token_glob, tmp_path_factory):
    """The same run as one process of 4 devices (the reference), as two processes of 2 devices (data
    parallel, then tp_size 2), and the 2x2 run's step-3 checkpoint resumed on one process of 4 devices
    with tp_size 2 (another process count and another mesh)."""
    work = str(tmp_path_factory.mktemp("layouts"))
    ckpt = {}
    with contextlib.ExitStack() as stack:
        runs = {name: start(stack, token_glob, work, name, name) for name in ("1x4", "2x2")}
        for name in runs:
            runs[name].wait()
            ckpt[name] = os.path.join(work, name, "ckpt")
        runs["2x2_tp2"] = start(stack, token_glob, work, "2x2_tp2", "2x2_tp2")
        moved = os.path.join(work, "moved", "ckpt")
        shutil.copytree(ckpt["2x2"], moved, ignore=lambda d, names: [n for n in names if d == ckpt["2x2"] and (n == "logs" or n == str(STEPS))])
        runs["moved"] = start(stack, token_glob, work, "moved", "1x4_tp2", ckpt=moved)
        outs = {name: runs[name].wait() for name in ("2x2_tp2", "moved")}
        ckpt["2x2_tp2"], ckpt["moved"] = os.path.join(work, "2x2_tp2", "ckpt"), moved
    return ckpt, outs


@pytest.mark.parametrize("layout", ["2x2", "2x2_tp2"])
def test_two_processes_of_two_devices_train_like_one_process_of_four(layouts, layout):
    ckpt, _ = layouts
    for kind in ("train", "validation"):
        want, got = losses_of(ckpt["1x4"], kind), losses_of(ckpt[layout], kind)
        assert sorted(got) == sorted(want) and want, kind
        np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=2e-5, err_msg=kind)


def test_checkpoint_of_two_processes_resumes_on_one_with_another_mesh(layouts):
    ckpt, outs = layouts
    out = outs["moved"][0]
    assert f"Resumed from {ckpt['moved']}/{CKPT_AT} at step {CKPT_AT}" in out, out[-3000:]
    assert "World size: 1 processes, 4 devices" in out and "'tensor': 2" in out
    got, want = losses_of(ckpt["moved"], "train"), losses_of(ckpt["1x4"], "train")
    assert sorted(got) == list(range(CKPT_AT + 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=2e-5)


@pytest.mark.parametrize("victim,sig", [(1, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_a_lost_process_ends_the_other_within_two_minutes(token_glob, tmp_path, victim, sig):
    """SIGKILL (the peer's sockets close: the next collective fails) or SIGSTOP (a frozen or unreachable
    node: only the missing heartbeats tell) one of two processes mid-run: the other exits non-zero
    with a line naming what it saw, well within 2 minutes (heartbeat_timeout_s 10 here)."""
    flags = as_flags(tiny_overrides(token_glob, str(tmp_path / "ckpt"), **{
        "step_scheduler.max_steps": 10_000, "step_scheduler.val_every_steps": 10_000, "step_scheduler.ckpt_every_steps": 10_000,
        "distributed.heartbeat_timeout_s": 10,
    }))
    with Processes(flags, str(tmp_path / "run"), n=2, devices=1) as p:
        p.wait_for(re.compile(r"\| step 3 \| epoch"))
        p.procs[victim].send_signal(sig)
        other = p.procs[1 - victim]
        code = other.wait(timeout=120)  # the bound the test is named for: TimeoutExpired past it
        out = p.output(1 - victim)
    assert code != 0, (code, out[-3000:])
    saw = re.search(r"lost contact with another process of the run.*|.*stopped sending heartbeats.*|.*leader task was preempted/died.*", out)
    assert saw, out[-3000:]
    if sig == signal.SIGSTOP:
        assert "stopped sending heartbeats" in out or "lost contact" in out
