"""The optimizer: AdamW as torch.optim.AdamW computes it, driven by the Megatron LR schedule.

Gradient clipping is not part of this chain: the train step computes the global norm once, logs it
(before clipping, as the seed does) and scales the gradients itself, so the norm is not computed twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from jaxpretrain.errors import ConfigError

if TYPE_CHECKING:
    import optax

SUPPORTED = ("adamw",)


def check_optimizer(cfg) -> None:
    """The `optimizer` section's choices and values (no jax needed)."""
    opt = cfg.optimizer
    if opt.name not in SUPPORTED:
        raise ConfigError(f"optimizer.name: {opt.name!r} is not supported (use 'adamw')")
    betas = opt.betas
    if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ConfigError(f"optimizer.betas: expected two numbers [beta1, beta2] such as [0.9, 0.95], got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ConfigError(f"optimizer.betas: beta{i + 1} must be a number in [0, 1), got {beta!r}")
    if not float(opt.eps) > 0.0:
        raise ConfigError(f"optimizer.eps: must be positive, got {opt.eps!r}")
    if not float(opt.weight_decay) >= 0.0:
        raise ConfigError(f"optimizer.weight_decay: must be zero or positive, got {opt.weight_decay!r}")
    if not float(opt.lr) > 0.0:
        raise ConfigError(f"optimizer.lr: must be positive, got {opt.lr!r}")


def build_optimizer(cfg, schedule: Callable, weight_decay=None) -> optax.GradientTransformation:
    """AdamW from the `optimizer` config section, its learning rate `schedule(updates_done)` (an
    LRSchedule, or the train step's schedule on traced numbers), and the weight decay of this update:
    a (traced) scalar from the weight-decay schedule, which the train step evaluates at the update
    count; None: optimizer.weight_decay. A scalar rather than a second schedule keeps the optimizer
    state exactly optax.adamw's, so checkpoints do not depend on the weight-decay schedule.

    optax.adamw equals torch's decoupled AdamW: both take lr x (m_hat / (sqrt(v_hat) + eps) + wd x p),
    with eps added after the square root of the bias-corrected second moment. Weight decay applies to
    every parameter, as in the seed (torch's AdamW on `model.parameters()` with one parameter group).
    """
    import optax

    check_optimizer(cfg)
    opt = cfg.optimizer
    b1, b2 = (float(b) for b in opt.betas)
    return optax.adamw(
        learning_rate=schedule, b1=b1, b2=b2, eps=float(opt.eps),
        weight_decay=float(opt.weight_decay) if weight_decay is None else weight_decay,
    )
