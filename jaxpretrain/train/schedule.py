"""The learning-rate and weight-decay schedules of Megatron's / NeMo Automodel's `OptimizerParamScheduler`.

The scheduler is created at step 0 (lr = init_lr) and stepped after every optimizer step, so optimizer
update k (1-based) runs at `lr(k - 1)` and the step line of step k shows `lr(k)`, as the seed's log
does (step 1: 6.08e-05 = 6e-5 + (6e-4 - 6e-5) / 700). optax calls a schedule with the number of
updates done so far, which is exactly `k - 1` for update k: `learning_rate_schedule` plugs in directly.
The weight decay is stepped with it: update k decays by `wd(k - 1)`, as torch's AdamW reads the
`weight_decay` the scheduler wrote into its parameter group.
"""

from __future__ import annotations

import dataclasses
import math

from jaxpretrain.errors import ConfigError

DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
# WSD (warmup-stable-decay): max_lr until the last `wsd_decay_steps` of the decay, then this anneal to min_lr.
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    init_lr: float
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_style: str = "cosine"
    wsd_decay_steps: int | None = None  # WSD only: the anneal's length, the last steps of the decay
    wsd_decay_style: str | None = None  # WSD only: one of WSD_DECAY_STYLES

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"lr_scheduler.lr_decay_style: {self.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
        if self.decay_style == "WSD":
            if self.wsd_decay_style not in WSD_DECAY_STYLES:
                raise ConfigError(
                    f"lr_scheduler.lr_wsd_decay_style: {self.wsd_decay_style!r} is not one of {', '.join(WSD_DECAY_STYLES)} "
                    "(lr_decay_style WSD needs one)"
                )
            if isinstance(self.wsd_decay_steps, bool) or not isinstance(self.wsd_decay_steps, int) or self.wsd_decay_steps <= 0:
                raise ConfigError(
                    f"lr_scheduler.wsd_decay_steps: {self.wsd_decay_steps!r} is not a positive number of steps "
                    "(lr_decay_style WSD anneals over the last wsd_decay_steps of the decay)"
                )
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ConfigError(f"lr_scheduler.min_lr: {self.min_lr:g} is not between 0 and the peak lr {self.max_lr:g} (lr_scheduler.max_lr; unset: optimizer.lr)")
        if self.init_lr > self.max_lr:
            raise ConfigError(f"lr_scheduler.init_lr: {self.init_lr:g} exceeds the peak lr {self.max_lr:g} (lr_scheduler.max_lr; unset: optimizer.lr)")
        if self.warmup_steps < 0:
            raise ConfigError(f"lr_scheduler.lr_warmup_steps: {self.warmup_steps} is negative")
        if self.warmup_steps >= self.decay_steps:
            raise ConfigError(
                f"lr_scheduler.lr_warmup_steps: {self.warmup_steps} is not below the decay steps ({self.decay_steps}: "
                "lr_scheduler.lr_decay_steps, or the run's steps when unset)"
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
            # WSD: the anneal starts after this many steps and lasts wsd_span (1 for other styles: unused).
            "wsd_start": self.decay_steps - (self.wsd_decay_steps or 0), "wsd_span": self.wsd_decay_steps or 1,
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
        elif self.decay_style == "WSD":
            wsd_ratio = jnp.clip((step - n["wsd_start"]) / n["wsd_span"], 0.0, 1.0)
            coeff = jnp.where(step <= n["wsd_start"], 1.0, _wsd_coeff(self.wsd_decay_style, wsd_ratio, jnp))
            decayed = n["min_lr"] + coeff * n["decay_delta"]
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
        if self.decay_style == "WSD":
            start = self.decay_steps - self.wsd_decay_steps
            coeff = 1.0 if s <= start else _wsd_coeff(self.wsd_decay_style, (s - start) / self.wsd_decay_steps, math)
            return self.min_lr + coeff * (self.max_lr - self.min_lr)
        ratio = (s - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if self.decay_style == "cosine" else 1.0 - ratio
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def describe(self) -> str:
        text = (f"init_lr {self.init_lr:.6g} max_lr {self.max_lr:.6g} min_lr {self.min_lr:.6g} warmup {self.warmup_steps} "
                f"decay {self.decay_steps} style {self.decay_style}")
        if self.decay_style == "WSD":
            text += f" (anneal: last {self.wsd_decay_steps} steps, {self.wsd_decay_style})"
        return text


def _wsd_coeff(style: str, ratio, xp):
    """The share of (max_lr - min_lr) left at `ratio` of WSD's anneal; xp: math, or jax.numpy when traced."""
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (xp.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * 0.5**ratio - 1.0
    return 1.0 - xp.sqrt(ratio)  # minus_sqrt


@dataclasses.dataclass(frozen=True)
class WeightDecaySchedule:
    """The weight decay of `OptimizerParamScheduler.get_wd`: start_wd rising to end_wd over incr_steps
    updates ("linear" or "cosine"), then end_wd; "constant": start_wd = end_wd throughout."""

    start_wd: float
    end_wd: float
    incr_steps: int
    incr_style: str = "constant"

    def __post_init__(self):
        if self.incr_style not in WD_INCR_STYLES:
            raise ConfigError(f"lr_scheduler.wd_incr_style: {self.incr_style!r} is not one of {', '.join(WD_INCR_STYLES)}")
        if not 0.0 <= self.start_wd <= self.end_wd:
            raise ConfigError(
                f"lr_scheduler.start_wd: {self.start_wd:g} is not between 0 and end_wd ({self.end_wd:g}; "
                "both default to optimizer.weight_decay)"
            )
        if self.incr_style == "constant" and self.start_wd != self.end_wd:
            raise ConfigError(
                f"lr_scheduler.wd_incr_style: constant, but start_wd {self.start_wd:g} differs from end_wd {self.end_wd:g} "
                "(use linear or cosine to move between them)"
            )
        if self.incr_style != "constant" and self.incr_steps <= 0:
            raise ConfigError(f"lr_scheduler.wd_incr_steps: {self.incr_steps} is not a positive number of steps")

    def numbers(self) -> dict:
        """As `LRSchedule.numbers`: an argument of the train step, so a weight-decay sweep shares one program."""
        import numpy as np

        values = {"start_wd": self.start_wd, "end_wd": self.end_wd, "incr_steps": max(self.incr_steps, 1),
                  "delta_wd": self.end_wd - self.start_wd}
        return {k: np.float32(v) for k, v in values.items()}

    def __call__(self, step, numbers: dict | None = None):
        """Weight decay after `step` scheduler steps (the decay of update step + 1), on traced jax scalars too."""
        import jax.numpy as jnp

        n = self.numbers() if numbers is None else numbers
        if self.incr_style == "constant":
            return jnp.asarray(n["end_wd"], jnp.float32)
        step = jnp.asarray(step, jnp.float32)
        ratio = jnp.clip(step / n["incr_steps"], 0.0, 1.0)
        coeff = ratio if self.incr_style == "linear" else 0.5 * (jnp.cos(math.pi * (1.0 - ratio)) + 1.0)
        return jnp.where(step > n["incr_steps"], n["end_wd"], n["start_wd"] + coeff * n["delta_wd"])

    def value(self, step: int) -> float:
        """The same in float64 Python arithmetic, as Megatron computes it."""
        if step > self.incr_steps or self.incr_style == "constant":
            return self.end_wd
        ratio = step / self.incr_steps
        coeff = ratio if self.incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def describe(self) -> str:
        if self.incr_style == "constant":
            return f"weight decay {self.end_wd:g}"
        return f"weight decay {self.start_wd:g} -> {self.end_wd:g} over {self.incr_steps} steps ({self.incr_style})"


# What the schedule's defaults stand for before the data is built (the config check ahead of any data
# work) when step_scheduler.max_steps is None: the run's length is then num_epochs x the train split's
# steps, known only once the split is built, so only the checks that need no length apply.
UNKNOWN_TOTAL_STEPS = 2**31 - 1


def total_steps_of(cfg, total_steps: int | None) -> int:
    """The run's optimizer steps, NeMo's `total_steps` (min(num_epochs x epoch length, max_steps)):
    `total_steps` as the built data gives it, else max_steps (its upper bound), else unknown."""
    if total_steps is not None:
        return int(total_steps)
    max_steps = cfg.step_scheduler.max_steps
    return UNKNOWN_TOTAL_STEPS if max_steps is None else int(max_steps)


def default_warmup_steps(total_steps: int) -> int:
    """NeMo Automodel's lr_warmup_steps when its lr_scheduler section leaves it out."""
    return min(1000, total_steps // 10)


def from_config(cfg, total_steps: int | None = None) -> LRSchedule:
    """Build the schedule from the `optimizer`, `lr_scheduler` and `step_scheduler` config sections;
    `total_steps`: the run's steps (train/setup.py's Data.total_steps), which unset decay and warmup
    lengths follow as NeMo's do; None: step_scheduler.max_steps."""
    lr = float(cfg.optimizer.lr)
    r = cfg.lr_scheduler
    max_lr = r.get("max_lr")
    total = total_steps_of(cfg, total_steps)
    warmup = r.lr_warmup_steps
    if warmup is None:  # NeMo's default; 0 while the length is unknown (it is checked once it is known)
        warmup = 0 if total == UNKNOWN_TOTAL_STEPS else default_warmup_steps(total)
    return LRSchedule(
        init_lr=0.1 * lr if r.init_lr is None else float(r.init_lr),
        max_lr=lr if max_lr is None else float(max_lr),
        min_lr=float(r.min_lr),
        warmup_steps=int(warmup),
        decay_steps=total if r.lr_decay_steps is None else int(r.lr_decay_steps),
        decay_style=r.lr_decay_style,
        wsd_decay_steps=r.get("wsd_decay_steps"),
        wsd_decay_style=r.get("lr_wsd_decay_style"),
    )


def wd_from_config(cfg, total_steps: int | None = None) -> WeightDecaySchedule:
    """The weight-decay schedule: lr_scheduler's start_wd/end_wd (unset: optimizer.weight_decay),
    wd_incr_steps (unset: the run's steps, as `from_config`) and wd_incr_style."""
    r, wd = cfg.lr_scheduler, float(cfg.optimizer.weight_decay)
    start, end, steps = r.get("start_wd"), r.get("end_wd"), r.get("wd_incr_steps")
    return WeightDecaySchedule(
        start_wd=wd if start is None else float(start),
        end_wd=wd if end is None else float(end),
        incr_steps=total_steps_of(cfg, total_steps) if steps is None else int(steps),
        incr_style=r.get("wd_incr_style", "constant"),
    )


def changes_since(saved_config: dict, cfg, total_steps: int | None = None) -> list[str]:
    """The schedule values in which `cfg` differs from the config a checkpoint was saved with (its
    meta's "config"), as "name old -> new": a resumed run follows the config's schedule from the next
    update on (NeMo keeps the checkpoint's unless override_opt_param_scheduler), so a changed
    max_steps, lr or warmup is said once at resume rather than seen later in the lr column."""
    import ml_collections

    try:
        saved = ml_collections.ConfigDict(saved_config)
        # The saved run's length: this run's when their max_steps agree (the same data), else its max_steps.
        saved_max = saved.step_scheduler.get("max_steps")
        before = _schedule_values(saved, total_steps if saved_max in (None, cfg.step_scheduler.max_steps) else None)
    except (AttributeError, KeyError, TypeError, ValueError):  # a checkpoint of a config we cannot read back: say nothing
        return []
    now = _schedule_values(cfg, total_steps)
    return [f"{k} {before[k]:g} -> {now[k]:g}" if isinstance(now[k], float) and isinstance(before[k], float)
            else f"{k} {before[k]} -> {now[k]}" for k in now if before.get(k) != now[k]]


def _schedule_values(cfg, total_steps: int | None) -> dict:
    """The lr schedule's fields and the weight-decay values that matter (only the decay itself when it
    is constant, so an unused wd_incr_steps never shows as a change)."""
    wd = wd_from_config(cfg, total_steps)
    lr = dataclasses.asdict(from_config(cfg, total_steps))
    if wd.incr_style == "constant":
        return {**lr, "weight_decay": wd.end_wd}
    return {**lr, "start_wd": wd.start_wd, "end_wd": wd.end_wd, "wd_incr_steps": wd.incr_steps, "wd_incr_style": wd.incr_style}
