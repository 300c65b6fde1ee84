"""Config mistakes that need no devices, data or model, checked before jax is imported.

The train CLI runs `check(cfg)` right after parsing, so a wrong schedule or optimizer answers in a
fraction of a second instead of after jax, the distributed start-up and the logging set-up (which
cost seconds per process). `train.setup.setup` checks the same things again, and everything that
needs the devices (batch divisibility, the mesh) or the model (its HF config), for library callers.
"""

from __future__ import annotations

import os

from jaxpretrain.errors import UserError
from jaxpretrain.train import cadence, optim, preemption
from jaxpretrain.train import schedule as schedule_lib


# Compute dtypes the models take (parameters stay float32 masters whatever this says).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(model) -> None:
    if model.dtype not in COMPUTE_DTYPES:
        raise UserError(f"model.dtype: {model.dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")


def check_checkpoint_dir(checkpoint) -> None:
    """checkpoint.checkpoint_dir must be a directory or creatable as one: found now, not at the first
    save after the compile (or, for a file, inside Orbax)."""
    restore = checkpoint.get("restore_from")
    if not checkpoint.enabled:
        if restore is not None and str(restore).strip().upper() not in ("", "LATEST"):
            raise UserError(f"checkpoint.restore_from: {restore} is set but checkpoint.enabled is false (a run restores and "
                            "saves checkpoints only with checkpoints on)")
        return
    path = os.path.abspath(str(checkpoint.checkpoint_dir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"checkpoint.checkpoint_dir: {checkpoint.checkpoint_dir} exists and is not a directory")
        target = path
    else:
        target = os.path.dirname(path)
        while not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise UserError(f"checkpoint.checkpoint_dir: {checkpoint.checkpoint_dir} cannot be created ({target} is a file)")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"checkpoint.checkpoint_dir: {checkpoint.checkpoint_dir} is not writable ({target})")


WANDB_MODES = ("online", "offline", "disabled", "shared")  # wandb.init's


def check_wandb(wandb_cfg) -> None:
    """W&B is optional: a set `wandb.project` without the package is found now, not after the compile."""
    import importlib.util

    mode = wandb_cfg.get("mode")
    if mode is not None and mode not in WANDB_MODES:
        raise UserError(f"wandb.mode: {mode!r} is not one of {', '.join(WANDB_MODES)}")
    if wandb_cfg.get("project") and importlib.util.find_spec("wandb") is None:
        raise UserError(f"wandb.project: {wandb_cfg.project!r} is set but the wandb package is not installed (pip install wandb)")


def check_splits(cfg) -> None:
    """Each section's `split` as Megatron parses it (numbers, one to three, some positive)."""
    from jaxpretrain.data.gpt_dataset import parse_split  # numpy only

    for section in ("dataset", "validation_dataset"):
        split = cfg[section].get("split")
        if split is not None:
            try:
                parse_split(split)
            except UserError as e:
                raise UserError(f"{section}.{e}") from None


def check(cfg) -> None:
    """Raise the first config mistake found without jax: a UserError naming the field."""
    cadence.check(cfg.step_scheduler)  # max_steps, num_epochs and the validation/checkpoint cadence
    preemption.parse_signals(cfg.step_scheduler.preemption_signal)
    check_dtype(cfg.model)
    optim.check_optimizer(cfg)  # before the schedule, which would blame lr_scheduler for a bad optimizer.lr
    schedule_lib.from_config(cfg)  # warmup below decay (max_steps' length), a known decay style, lr bounds
    schedule_lib.wd_from_config(cfg)  # a known increment style, 0 <= start_wd <= end_wd
    check_checkpoint_dir(cfg.checkpoint)
    check_splits(cfg)
    check_wandb(cfg.wandb)
