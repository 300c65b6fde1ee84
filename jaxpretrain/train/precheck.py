"""Config mistakes that need no devices, data or model, checked before jax is imported.

The train CLI runs `check(cfg)` right after parsing, so a wrong schedule or optimizer answers in a
fraction of a second instead of after jax, the distributed start-up and the logging set-up (which
cost seconds per process). `train.setup.setup` checks the same things again, and everything that
needs the devices (batch divisibility, the mesh) or the model (its HF config), for library callers.
"""

from __future__ import annotations

from jaxpretrain.errors import UserError
from jaxpretrain.train import optim
from jaxpretrain.train import schedule as schedule_lib


def check_max_steps(step_scheduler) -> None:
    if int(step_scheduler.max_steps) <= 0:
        raise UserError("step_scheduler.max_steps: must be positive")


def check(cfg) -> None:
    """Raise the first config mistake found without jax: a UserError naming the field."""
    check_max_steps(cfg.step_scheduler)
    schedule_lib.from_config(cfg)  # warmup below decay, a known decay style, lr bounds
    optim.check_optimizer(cfg)
