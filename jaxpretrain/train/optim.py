"""The optimizer: AdamW as torch.optim.AdamW computes it, driven by the Megatron LR schedule.

Gradient clipping is not part of this chain: the train step computes the global norm once, logs it
(before clipping, as the seed does) and scales the gradients itself, so the norm is not computed twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxpretrain.errors import ConfigError
from jaxpretrain.train.schedule import LRSchedule

if TYPE_CHECKING:
    import optax

SUPPORTED = ("adamw",)


def check_optimizer(cfg) -> None:
    """The `optimizer` section's choices (no jax needed)."""
    if cfg.optimizer.name not in SUPPORTED:
        raise ConfigError(f"optimizer.name: {cfg.optimizer.name!r} is not supported (use 'adamw')")


def build_optimizer(cfg, schedule: LRSchedule) -> optax.GradientTransformation:
    """AdamW from the `optimizer` config section.

    optax.adamw equals torch's decoupled AdamW: both take lr x (m_hat / (sqrt(v_hat) + eps) + wd x p),
    with eps added after the square root of the bias-corrected second moment. Weight decay applies to
    every parameter, as in the seed (torch's AdamW on `model.parameters()` with one parameter group).
    """
    import optax

    check_optimizer(cfg)
    opt = cfg.optimizer
    b1, b2 = (float(b) for b in opt.betas)
    return optax.adamw(
        learning_rate=schedule, b1=b1, b2=b2, eps=float(opt.eps), weight_decay=float(opt.weight_decay)
    )
