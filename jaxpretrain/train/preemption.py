"""SIGTERM (SLURM's preemption notice): save a checkpoint and exit, every process at the same step."""

from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger("jaxpretrain")

# Exit status of a run stopped by SIGTERM after saving its checkpoint: EX_TEMPFAIL (sysexits.h,
# "try again later"). scripts/slurm/train.sbatch requeues the job on this status only; a finished run
# exits 0, bad input 2, a crash 1 (or a signal's status), and those are never requeued.
EXIT_STOPPED = 75


class StopSignal:
    """SIGTERM (SLURM's preemption notice) asks for a checkpoint and a clean exit.

    A Python handler sets a flag. One process: the flag is read after each step. Several processes
    (each signalled on its own, not at the same step) must all stop at the same step: the first to
    see its flag after step k publishes `k + LAG` under one key of jax.distributed's key-value store
    (first writer wins), and every process reads that key after each step (one small RPC to the
    coordinator, no device collective) and stops there. LAG = 2 is enough because no process can
    get past `should_stop(k + 2)` before every other one has finished `should_stop(k)`: before
    `should_stop(m)` the loop waits on step m - 1 (its metrics, or the validation/checkpoint of m - 1),
    which needs every process to have dispatched step m - 1, which each does after `should_stop(m - 2)`.

    JAX's own preemption sync service (`multihost_utils.reached_preemption_sync_point`) is not used:
    its step counter starts at 0 in every process, so a notice that arrives before the first step of
    a resumed run sets the sync point to step 1, which a run resumed at step N > 0 never reaches: it
    trains on, ignoring SIGTERM, until it is killed. Orbax's CheckpointManager also feeds it steps
    from its finalize thread. Our handler replaces the one jax.distributed installs, so build this
    right after joining the run.
    """

    LAG = 2
    _instances = 0  # one key per StopSignal in the run: every process builds them in the same order

    def __init__(self):
        self.received = False
        self.stop_at: int | None = None
        self._published = False
        signal.signal(signal.SIGTERM, self._handle)
        self._client = None
        if jax.process_count() > 1:
            from jax._src import distributed

            self._client = distributed.global_state.client
            self._dir = f"jaxpretrain/stop_signal/{StopSignal._instances}/"
            StopSignal._instances += 1

    def _handle(self, signum, frame):
        self.received = True

    def should_stop(self, step: int) -> bool:
        if self._client is None:
            return self.received
        if self.stop_at is None:
            if self.received and not self._published:
                self._published = True
                try:
                    self._client.key_value_set(self._dir + "at", str(step + self.LAG))
                except jax.errors.JaxRuntimeError as e:  # another process published first: theirs holds
                    if "ALREADY_EXISTS" not in str(e):
                        raise
            found = self._client.key_value_dir_get(self._dir)
            if found:
                self.stop_at = int(found[0][1])
                if step > self.stop_at:
                    raise RuntimeError(f"SIGTERM: step {self.stop_at} was agreed as the last step, but this process is at {step}")
                log.info("SIGTERM: every process stops after step %d", self.stop_at)
        return self.stop_at is not None and step >= self.stop_at
