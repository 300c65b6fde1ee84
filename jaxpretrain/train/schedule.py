"""The learning-rate schedule of Megatron's / NeMo Automodel's `OptimizerParamScheduler`.

The scheduler is created at step 0 (lr = init_lr) and stepped after every optimizer step, so optimizer
update k (1-based) runs at `lr(k - 1)` and the step line of step k shows `lr(k)`, as the seed's log
does (step 1: 6.08e-05 = 6e-5 + (6e-4 - 6e-5) / 700). optax calls a schedule with the number of
updates done so far, which is exactly `k - 1` for update k: `learning_rate_schedule` plugs in directly.
"""

from __future__ import annotations

import dataclasses
import math

from jaxpretrain.errors import ConfigError

DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    init_lr: float
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_style: str = "cosine"

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"lr_scheduler.lr_decay_style: {self.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ConfigError(f"lr_scheduler.min_lr: {self.min_lr:g} is not between 0 and optimizer.lr ({self.max_lr:g})")
        if self.init_lr > self.max_lr:
            raise ConfigError(f"lr_scheduler.init_lr: {self.init_lr:g} exceeds optimizer.lr ({self.max_lr:g})")
        if self.warmup_steps < 0:
            raise ConfigError(f"lr_scheduler.lr_warmup_steps: {self.warmup_steps} is negative")
        if self.warmup_steps >= self.decay_steps:
            raise ConfigError(
                f"lr_scheduler.lr_warmup_steps: {self.warmup_steps} is not below the decay steps ({self.decay_steps}: "
                "lr_scheduler.lr_decay_steps, or step_scheduler.max_steps when unset)"
            )

    def numbers(self) -> dict:
        """The schedule's numbers as float32 scalars, which the train step takes as an argument rather
        than as constants: one compiled step serves every learning rate, warmup and decay length (a
        sweep, or a rerun with more max_steps, recompiles nothing). The derived terms are computed
        here in float64, as Python constants folded into the program would be, so the step's float32
        arithmetic is the same either way."""
        import numpy as np

        warm = max(self.warmup_steps, 1)
        values = {
            "init_lr": self.init_lr, "max_lr": self.max_lr, "min_lr": self.min_lr,
            "warmup_span": self.max_lr - self.init_lr, "warm": warm, "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps, "decay_span": self.decay_steps - self.warmup_steps,
            "decay_delta": self.max_lr - self.min_lr, "inv_sqrt_scale": self.max_lr * math.sqrt(warm),
        }
        return {k: np.float32(v) for k, v in values.items()}

    def __call__(self, step, numbers: dict | None = None):
        """Learning rate after `step` scheduler steps; works on Python ints and traced jax scalars.
        `numbers`: `self.numbers()`, possibly traced (the train step's argument); None: this schedule's."""
        import jax.numpy as jnp  # here: the train CLI checks a schedule before it imports jax

        n = self.numbers() if numbers is None else numbers
        step = jnp.asarray(step, jnp.float32)
        warmup_lr = n["init_lr"] + n["warmup_span"] * step / n["warm"]
        ratio = jnp.clip((step - n["warmup_steps"]) / n["decay_span"], 0.0, 1.0)
        if self.decay_style == "cosine":
            decayed = n["min_lr"] + 0.5 * (jnp.cos(math.pi * ratio) + 1.0) * n["decay_delta"]
        elif self.decay_style == "linear":
            decayed = n["min_lr"] + (1.0 - ratio) * n["decay_delta"]
        elif self.decay_style == "inverse-square-root":
            decayed = jnp.maximum(n["min_lr"], n["inv_sqrt_scale"] / jnp.sqrt(jnp.maximum(step, 1.0)))
        else:
            decayed = jnp.asarray(n["max_lr"], jnp.float32)
        if self.decay_style != "constant":
            decayed = jnp.where(step > n["decay_steps"], n["min_lr"], decayed)
        in_warmup = (n["warmup_steps"] > 0) & (step <= n["warmup_steps"])
        return jnp.where(in_warmup, warmup_lr, decayed)

    def value(self, step: int) -> float:
        """The same schedule in float64 Python arithmetic, for logging exactly what Megatron prints."""
        s = float(step)
        if self.warmup_steps > 0 and s <= self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * s / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if s > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * max(self.warmup_steps, 1) ** 0.5 / max(s, 1.0) ** 0.5)
        ratio = (s - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if self.decay_style == "cosine" else 1.0 - ratio
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


def from_config(cfg) -> LRSchedule:
    """Build the schedule from the `optimizer`, `lr_scheduler` and `step_scheduler` config sections."""
    lr = float(cfg.optimizer.lr)
    init_lr = cfg.lr_scheduler.init_lr
    decay_steps = cfg.lr_scheduler.lr_decay_steps
    return LRSchedule(
        init_lr=0.1 * lr if init_lr is None else float(init_lr),
        max_lr=lr,
        min_lr=float(cfg.lr_scheduler.min_lr),
        warmup_steps=int(cfg.lr_scheduler.lr_warmup_steps),
        decay_steps=int(cfg.step_scheduler.max_steps if decay_steps is None else decay_steps),
        decay_style=cfg.lr_scheduler.lr_decay_style,
    )
