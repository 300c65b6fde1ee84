"""Non-finite losses and gradient norms: stop with the step named, or skip a few such steps.

The train step itself never applies a non-finite update (`step.py`: a `jnp.where` on finiteness,
fused into the update, no host sync) and reports `finite`; the host reads that flag with the loss,
one step late as it reads every metric. `NonFiniteGuard` decides what happens next:
`optimizer.skip_nonfinite_steps = 0` stops the run at the first such step; N > 0 logs each skipped
step and stops at the (N + 1)-th in a row. Stopping never saves: the last checkpoint written before
is the one a rerun resumes from. Before every save `all_finite` checks the state once more, so an
update that overflowed (finite loss and gradients, non-finite parameters) is not written either.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxpretrain.errors import UserError

log = logging.getLogger("jaxpretrain")


class NonFiniteError(UserError):
    """Training produced a non-finite loss, gradient norm or state; nothing of it was saved."""


class NonFiniteGuard:
    def __init__(self, max_skips: int):
        if max_skips < 0:
            raise UserError(f"optimizer.skip_nonfinite_steps: must be >= 0, got {max_skips}")
        self.max_skips = int(max_skips)
        self.in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float, finite: bool, kept: str) -> bool:
        """True when step `step` was skipped (logged); raises NonFiniteError when the run must stop.
        `kept` says which checkpoint survives, for the message."""
        if finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        what = f"step {step}: loss {loss} / grad_norm {grad_norm} is not finite"
        if self.in_a_row > self.max_skips:
            limit = (
                f"{self.in_a_row} steps in a row, more than optimizer.skip_nonfinite_steps={self.max_skips}"
                if self.max_skips else "set optimizer.skip_nonfinite_steps=N to skip up to N such steps in a row"
            )
            raise NonFiniteError(f"{what}; stopped without saving ({limit}); {kept}")
        log.warning("%s: update skipped (%d of at most %d in a row)", what, self.in_a_row, self.max_skips)
        return True


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
    """Every floating-point value of `tree` is finite (one reduction on the devices, one bool back)."""
    return bool(_all_finite(tree))
