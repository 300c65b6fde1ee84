"""The optimizer: AdamW as torch.optim.AdamW computes it, driven by the Megatron LR schedule.

Gradient clipping is not part of this chain: the train step computes the global norm once, logs it
(before clipping, as the seed does) and scales the gradients itself, so the norm is not computed twice.
"""

from __future__ import annotations

import optax

from jaxpretrain.errors import ConfigError

from jaxpretrain.train.schedule import LRSchedule


def build_optimizer(cfg, schedule: LRSchedule) -> optax.GradientTransformation:
    """AdamW from the `optimizer` config section.

    optax.adamw equals torch's decoupled AdamW: both take lr x (m_hat / (sqrt(v_hat) + eps) + wd x p),
    with eps added after the square root of the bias-corrected second moment. Weight decay applies to
    every parameter, as in the seed (torch's AdamW on `model.parameters()` with one parameter group).
    """
    opt = cfg.optimizer
    if opt.name != "adamw":
        raise ConfigError(f"optimizer.name: {opt.name!r} is not supported (use 'adamw')")
    b1, b2 = (float(b) for b in opt.betas)
    return optax.adamw(
        learning_rate=schedule, b1=b1, b2=b2, eps=float(opt.eps), weight_decay=float(opt.weight_decay)
    )
