"""SIGTERM (SLURM's preemption notice; or the signals `step_scheduler.preemption_signal` names) or
Ctrl-C: save a checkpoint and exit, every process at the same step. A second Ctrl-C exits at once."""

from __future__ import annotations

import logging
import signal

from jaxpretrain.errors import UserError

log = logging.getLogger("jaxpretrain")

FIELD = "step_scheduler.preemption_signal"


def parse_signals(value) -> tuple[signal.Signals, ...]:
    """`step_scheduler.preemption_signal` as NeMo's StepScheduler takes it: a signal name (SIGUSR1 or
    USR1), a number, or several of them (a list, or comma-separated); None or "none": no preemption
    handler (the signal's default action then ends the run without a checkpoint)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    found = []
    for item in items:
        text = str(item).strip()
        name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[name]
        except (KeyError, ValueError):
            raise UserError(f"{FIELD}: {text!r} is not a signal (e.g. SIGTERM, SIGUSR1, 10)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(f"{FIELD}: {sig.name} cannot be caught")
        if sig not in found:
            found.append(sig)
    return tuple(found)

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

    Ctrl-C (SIGINT) is the same request: save at the next step, then exit. Its handler then gives
    SIGINT back to the system's default action, so a second Ctrl-C ends the process at once, even
    inside a long compilation or a collective where no Python code runs (what a killed save leaves is
    never resumed from: see checkpoint.py).
    """

    LAG = 2
    _instances = 0  # one key per StopSignal in the run: every process builds them in the same order

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        import jax  # here, not at the top: precheck parses the signals before jax is imported

        self.received = False
        self.name = "SIGTERM"  # the signal that asked for the stop, for the log
        self.stop_at: int | None = None
        self._published = False
        for sig in {*signals, signal.SIGINT}:
            signal.signal(sig, self._handle)
        if signal.SIGTERM not in signals:  # jax.distributed's own SIGTERM handler must not stay either
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._client = None
        if jax.process_count() > 1:
            from jax._src import distributed

            self._client = distributed.global_state.client
            self._dir = f"jaxpretrain/stop_signal/{StopSignal._instances}/"
            StopSignal._instances += 1

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            log.warning("Ctrl-C: saving a checkpoint after this step, then exiting; press Ctrl-C again to exit at once")
        if not self.received:
            self.name = signal.Signals(signum).name
        self.received = True

    def should_stop(self, step: int) -> bool:
        import jax

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
                    raise RuntimeError(f"{self.name}: step {self.stop_at} was agreed as the last step, but this process is at {step}")
                log.info("%s: every process stops after step %d", self.name, self.stop_at)
        return self.stop_at is not None and step >= self.stop_at
