"""Which steps validate and which save a checkpoint: NeMo Automodel's StepScheduler, step for step.

Steps count from 1 here (the step just taken); NeMo's count from 0 before its increment, so its
`step % n == n - 1` is `step % n == 0` here. Proven against NeMo's own `StepSchedulerConfig.build`
in tests/test_cadence.py.

  checkpoint  every `ckpt_every_steps`, at the end of each epoch (`save_checkpoint_every_epoch`),
              at the last step, and when the run is stopping (SIGTERM, Ctrl-C, time limit).
  remote log  train metrics to W&B every `log_remote_every_steps`: NeMo's steps 0, n, 2n, ..., so
              here 1, n + 1, 2n + 1, ... (JSONL, TensorBoard and validation get every record).
  validation  every `val_every_steps` (None or 0: never periodically) and at each checkpoint step
              (`validate_on_checkpoint`), but not while stopping: a preemption's grace period goes
              to the checkpoint. `val_every_steps: 0` turns validation off altogether (no
              validation data is built), None is NeMo's "no periodic validation".
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxpretrain.data.builder import ONE_EPOCH
from jaxpretrain.errors import UserError

# NeMo's MegatronPretraining sizes the validation split with this interval when val_every_steps is
# None: (max_steps // 1000) x global batch samples.
NEMO_VAL_CHECK_INTERVAL = 1000


def _count(value, lowest: int) -> bool:
    """An int (not a bool) of at least `lowest`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def check(step_scheduler) -> None:
    """The cadence fields as NeMo's StepScheduler accepts them (it raises on the same values)."""
    ss = step_scheduler
    if ss.max_steps is not None and not _count(ss.max_steps, 1):
        raise UserError(f"step_scheduler.max_steps: must be a positive number of steps (none: num_epochs whole "
                        f"epochs), got {ss.max_steps!r}")
    if not _count(ss.num_epochs, 1):
        raise UserError(f"step_scheduler.num_epochs: must be a positive number of passes over the train split, got {ss.num_epochs!r}")
    if not _count(ss.ckpt_every_steps, 1):
        raise UserError(f"step_scheduler.ckpt_every_steps: must be a positive number of steps, got {ss.ckpt_every_steps!r}")
    if not _count(ss.log_remote_every_steps, 1):
        raise UserError(f"step_scheduler.log_remote_every_steps: must be a positive number of steps, got {ss.log_remote_every_steps!r}")
    if ss.val_every_steps is not None and not _count(ss.val_every_steps, 0):
        raise UserError(f"step_scheduler.val_every_steps: must be a number of steps (0: never; none: only at "
                        f"checkpoints), got {ss.val_every_steps!r}")


def validation_runs(step_scheduler) -> bool:
    """Whether any step can validate (else no validation data need be built)."""
    val = step_scheduler.val_every_steps
    return bool(val) or (val is None and bool(step_scheduler.validate_on_checkpoint))


def val_samples_per_run(step_scheduler, num_val_samples: int | None, global_batch_size: int,
                        num_train_samples: int | None = None) -> int:
    """Validation samples as NeMo's MegatronPretraining builds them: `num_val_samples` if set, else
    (train steps // val_every_steps, or // 1000 without one) x the global batch, where the train steps
    are num_train_samples / global batch if set, else max_steps; without either, ONE_EPOCH (the whole
    validation split, Megatron's size None). 0 when no step can validate."""
    if not validation_runs(step_scheduler):
        return 0
    if num_val_samples:
        return int(num_val_samples)
    if num_train_samples:
        train_steps = int(num_train_samples) // global_batch_size
    elif step_scheduler.max_steps is not None:
        train_steps = int(step_scheduler.max_steps)
    else:
        return ONE_EPOCH
    interval = step_scheduler.val_every_steps or NEMO_VAL_CHECK_INTERVAL
    return (train_steps // interval) * global_batch_size


def total_steps(max_steps: int | None, steps_per_epoch: int, num_epochs: int) -> int:
    """The run's last step, NeMo's: max_steps, or fewer when num_epochs passes over the train split
    end first; without max_steps, num_epochs x the epoch's steps (StepScheduler's max_steps then)."""
    epochs_end = int(steps_per_epoch) * int(num_epochs)
    return epochs_end if max_steps is None else min(int(max_steps), epochs_end)


@dataclass(frozen=True)
class Cadence:
    total_steps: int  # the run's last step (`total_steps()` below)
    steps_per_epoch: int
    ckpt_every_steps: int
    val_every_steps: int | None
    validate_on_checkpoint: bool
    save_checkpoint_every_epoch: bool
    has_validation: bool  # validation data was built
    log_remote_every_steps: int = 1

    @classmethod
    def from_config(cls, step_scheduler, *, total_steps: int, steps_per_epoch: int, has_validation: bool) -> Cadence:
        ss = step_scheduler
        return cls(int(total_steps), int(steps_per_epoch), int(ss.ckpt_every_steps), ss.val_every_steps,
                   bool(ss.validate_on_checkpoint), bool(ss.save_checkpoint_every_epoch), bool(has_validation),
                   int(ss.log_remote_every_steps))

    @classmethod
    def of_run(cls, step_scheduler, data) -> Cadence:
        """For a run's built data (train/setup.py's Data: total_steps, steps_per_epoch, validation)."""
        return cls.from_config(step_scheduler, total_steps=data.total_steps, steps_per_epoch=data.steps_per_epoch,
                               has_validation=data.validation is not None)

    def checkpoint(self, step: int, stopping: bool = False) -> bool:
        epoch_end = self.save_checkpoint_every_epoch and step % self.steps_per_epoch == 0
        return step % self.ckpt_every_steps == 0 or epoch_end or step == self.total_steps or stopping

    def validate(self, step: int, stopping: bool = False) -> bool:
        if not self.has_validation or stopping:
            return False
        periodic = bool(self.val_every_steps) and step % self.val_every_steps == 0
        return periodic or (self.validate_on_checkpoint and self.checkpoint(step))

    def log_remote(self, step: int) -> bool:
        """Whether the step's train metrics go to W&B (NeMo's is_remote_logging_step)."""
        return (step - 1) % self.log_remote_every_steps == 0

    def describe(self) -> str:
        """For the run's "Steps:" line: when it validates and checkpoints."""
        if not self.has_validation:
            val = "no validation"
        elif self.val_every_steps:
            val = f"validation every {self.val_every_steps}" + (" and at checkpoints" if self.validate_on_checkpoint else "")
        else:
            val = "validation at checkpoints"
        return f"{val}, checkpoint every {self.ckpt_every_steps}"
