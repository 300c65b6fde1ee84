"""The processes of a run: joining one (SLURM, JAX_* variables, or alone), the start-up line that says
how, leaving it together, what happens when a peer is lost, and the CPU client's thread pool.

Joining: under `srun` with more than one task, SLURM's variables say where to meet (GPUs per task:
`slurm_local_device_ids`); otherwise `JAX_COORDINATOR_ADDRESS` (host:port of process 0),
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; without either the run is a single process.

A lost peer (SIGKILL, OOM, a node gone): its sockets close, so the next collective or coordination
call of every other process fails, and `exit_at_once_on_error` turns that into one line and exit 1. A peer
that is frozen or unreachable sends no heartbeats: after `heartbeat_timeout_s` jax.distributed's
coordination service ends every other process itself (XLA's "Terminating process because the JAX
distributed service detected fatal errors ... stopped sending heartbeats", status 134).

The CPU thread pool (`size_cpu_thread_pool`). XLA's PjRt CPU client runs two kinds of work on one
pool of max(cores, local devices) threads: the per-device launch of each program, which blocks when
the device already has its limit of programs in flight (32), and the programs themselves, of which
a cross-process collective holds its thread until every peer's shard has arrived (the client runs
one collective program at a time, in dispatch order). Dispatch enough small cross-process programs
back to back (`param_l2_norm`, one reduction per parameter; an eval loop; a restore;
`process_allgather` per tensor) and the limit fills: launch threads block on it while the oldest
collective still needs a thread for each local device's shard. With 2 devices on 2 cores the pool
has 2 threads: one runs a shard of the collective, the other waits on the limit, the second shard
never gets a thread, and every process waits forever (gdb: one pool thread in `gloo::allreduce`, one
in `xla::Semaphore::Acquire`; SIGTERM's Python handler never runs, as the main thread is inside
Execute). Each local device needs a thread for its shard and one for a blocked launch; 4 per device
leave room for a second dispatching thread. The size is read once, from `PJRT_NPROC`, when the CPU
client is created. GPU clients run collectives on device streams, not on host threads: unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import traceback

import jax

from jaxpretrain.errors import UserError

ENV_NAMES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
THREADS_PER_CPU_DEVICE = 4  # >= 2 (a running shard + a blocked launch per device); see the docstring


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joined its run, for the start-up log."""

    mode: str  # "single", "env" (JAX_* variables) or "slurm"
    coordinator: str | None = None
    slurm_job: str | None = None  # job id (and step) under SLURM


_launch = Launch("single")


def initialize_distributed(heartbeat_timeout_s: int | None = None) -> bool:
    """Join a multi-process run if this process was started as part of one; returns whether it did.

    Call it before anything touches a jax device (the CPU pool size and the collectives are fixed
    when the backend starts). `heartbeat_timeout_s`: seconds without a heartbeat before a process
    counts as dead (None: jax's default, 100).
    """
    global _launch
    if jax.distributed.is_initialized():
        return True
    size_cpu_thread_pool()
    env = os.environ
    explicit = [k for k in ENV_NAMES if env.get(k)]
    # srun (not sbatch) sets SLURM_STEP_NUM_TASKS: a batch script's own single process, which sees
    # the allocation's SLURM_NTASKS, must not wait for peers that will never come.
    in_srun = int(env.get("SLURM_STEP_NUM_TASKS") or 1) > 1 and "SLURM_PROCID" in env
    if not explicit and not in_srun:
        return False
    if explicit and len(explicit) < 3:
        missing = [k for k in ENV_NAMES if k not in explicit]
        raise UserError(f"environment: {', '.join(explicit)} set but {', '.join(missing)} missing")
    # CPU devices of different processes only talk through gloo (it is unused on GPU runs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {} if heartbeat_timeout_s is None else {"heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
    if explicit:
        try:
            num, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise UserError("environment: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=num, process_id=pid, **kw)
        mode, job = "env", None
    else:
        from jax._src.clusters.slurm_cluster import SlurmCluster

        # jax's own SLURM detection, except for the GPUs each task drives (slurm_local_device_ids).
        coordinator = SlurmCluster.get_coordinator_address(None, env.get("JAX_COORDINATOR_PORT"))
        jax.distributed.initialize(
            coordinator, num_processes=int(env["SLURM_STEP_NUM_TASKS"]), process_id=int(env["SLURM_PROCID"]),
            local_device_ids=slurm_local_device_ids(env), cluster_detection_method="deactivate", **kw,
        )
        mode = "slurm"
        job = env.get("SLURM_JOB_ID", "?") + (f" step {env['SLURM_STEP_ID']}" if env.get("SLURM_STEP_ID") else "")
    from jax._src import distributed

    _launch = Launch(mode, distributed.global_state.coordinator_address, job)
    return True


def slurm_local_device_ids(env=os.environ) -> list[int] | None:
    """The GPUs (CUDA ordinals as this task sees them) this SLURM task drives; None: all it sees.

    jax's SLURM detection always takes GPU number SLURM_LOCALID alone, which is right only for one
    task per GPU without binding. Here: one task on its node -> every GPU it sees; SLURM bound a
    subset to each task (--gpus-per-task, --gpu-bind: fewer visible GPUs than tasks on the node, or
    one) -> every GPU it sees; T tasks sharing the node's V GPUs -> block SLURM_LOCALID of V / T.
    """
    tasks = _tasks_on_this_node(env)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    local = int(env.get("SLURM_LOCALID", 0))
    if tasks <= 1:
        return None
    if not visible:
        return [local]  # several tasks, GPUs not listed: jax's rule (one GPU each, by local id)
    if len(visible) < tasks or len(visible) % tasks:
        return None
    per_task = len(visible) // tasks
    return list(range(local * per_task, (local + 1) * per_task))


def _tasks_on_this_node(env) -> int:
    """Tasks of this job step on this node, from SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2, 2, 2, 1)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else (counts[-1] if counts else 1)


def launch() -> Launch:
    return _launch


def startup_line() -> str:
    """One line: how the run was launched, this process, its devices, the coordinator."""
    l = _launch
    mode = {"single": "single process", "env": "JAX_* environment variables", "slurm": f"SLURM job {l.slurm_job}"}[l.mode]
    local = jax.local_devices()
    parts = [
        f"launch: {mode}",
        f"process {jax.process_index()} of {jax.process_count()}",
        f"local devices {len(local)} ({local[0].device_kind})",
        f"global devices {jax.device_count()}",
    ]
    if l.coordinator:
        parts.append(f"coordinator {l.coordinator}")
    return "Processes: " + " | ".join(parts)


def barrier(name: str, timeout_s: float = 600) -> None:
    """Wait until every process of the run reaches `name` (the coordination service's barrier, not a
    device collective); nothing to do for a single process."""
    if jax.process_count() > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


@contextlib.contextmanager
def first_process_first(name: str, timeout_s: float = 3600):
    """Process 0 runs the block before every other process does (they wait at a barrier): what it
    writes to a shared filesystem (the index cache) the others then find and read instead of building
    it again. Where the directory is node-local, each node's first reader builds its own copy. When
    the block fails in process 0, the others are let through all the same (and meet the same error)."""
    first = jax.process_index() == 0
    if jax.process_count() > 1 and not first:
        barrier(name, timeout_s)
    try:
        yield
    finally:
        if jax.process_count() > 1 and first:
            barrier(name, timeout_s)


def leave_run() -> None:
    """Leave a multi-process run together, then let nothing stop the exit.

    jax.distributed.shutdown() waits for every process (so none leaves while process 0 still commits
    the last checkpoint), after which the processes exit within moments of each other. Under
    `srun --kill-on-bad-exit`, the first one out with a non-zero status (75 after SIGTERM) makes
    SLURM send SIGTERM to the rest, and jax's shutdown has put back SIGTERM's default action, which
    would turn their 75 into "killed by a signal" (143). So SIGTERM is ignored from here on.
    """
    if jax.process_count() > 1 and jax.distributed.is_initialized():
        jax.distributed.shutdown()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


# What a collective or a coordination-service call reports when a peer process is gone.
PEER_LOSS = re.compile(
    r"Gloo|Connection (closed|reset) by peer|coordination service|stopped sending heartbeats|NCCL|"
    r"Socket closed|failed to connect to all addresses|DEADLINE_EXCEEDED: Barrier",
    re.IGNORECASE,
)


@contextlib.contextmanager
def exit_at_once_on_error():
    """In a multi-process run, an error ends this process at once, so its peers notice (their next
    collective fails) instead of waiting: a normal exit would first sit in jax.distributed's shutdown
    barrier, for up to 5 minutes, waiting for peers that are themselves waiting on this process.

    An error that says a peer is gone (SIGKILL, OOM, a lost node) becomes one line naming what it
    saw, status 1; a UserError its usual `error:` line, status 2; anything else its traceback,
    status 1. A frozen or unreachable peer, whose sockets stay open, is caught by the coordination
    service after `heartbeat_timeout_s` instead (status 134, see the module docstring).
    """
    try:
        yield
    except Exception as e:
        if jax.process_count() < 2:
            raise
        me = f"process {jax.process_index()} of {jax.process_count()}"
        if isinstance(e, UserError):
            message, status = f"error: {e}", 2
        elif isinstance(e, jax.errors.JaxRuntimeError) and PEER_LOSS.search(str(e)):
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            message, status = f"error: {me}: lost contact with another process of the run (killed, out of memory, or its node lost): {first}", 1
        else:
            traceback.print_exc()
            message, status = f"error: {me} failed ({type(e).__name__}); exiting so that its peers stop too", 1
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        os._exit(status)  # not sys.exit: see above


# ------------------------------------------------------------------------------------------------
# The CPU client's thread pool
# ------------------------------------------------------------------------------------------------


def cpu_local_device_count() -> int:
    """CPU devices this process will have (`jax_num_cpu_devices` or XLA's forced count; default 1)."""
    n = int(jax.config.jax_num_cpu_devices)
    if n > 0:
        return n
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else 1


def default_pool_size() -> int:
    """What XLA sizes its CPU pool by when nothing says otherwise: PJRT_NPROC, NPROC, else the cores."""
    for name in ("PJRT_NPROC", "NPROC"):
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def size_cpu_thread_pool() -> int | None:
    """Raise the CPU client's pool to THREADS_PER_CPU_DEVICE x local CPU devices when it would be
    smaller (see the module docstring); returns the size set, or None when nothing changed. Must run
    before the backend starts. A one-device process, or a machine with enough cores, is left alone."""
    n = cpu_local_device_count()
    need = THREADS_PER_CPU_DEVICE * n
    if n < 2 or default_pool_size() >= need:
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("size_cpu_thread_pool: the XLA backend has already started; call it before any device use")
    os.environ["PJRT_NPROC"] = str(need)  # read by XLA's DefaultThreadPoolSize() when the client is made
    return need
