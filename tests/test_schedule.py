"""The LR schedule against NeMo Automodel's own OptimizerParamScheduler, step by step."""

import math

import numpy as np
import pytest
import torch
from nemo_automodel.components.optim.scheduler import OptimizerParamScheduler

from jaxpretrain.train.schedule import LRSchedule


def reference_lrs(init_lr, max_lr, min_lr, warmup, decay, style, n_steps):
    """The lr torch's optimizer holds after 0..n_steps scheduler steps, as the recipe drives it."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = OptimizerParamScheduler(
        opt, init_lr=init_lr, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=decay, wd_incr_style="constant",
    )
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(n_steps):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    return np.array(lrs)


@pytest.mark.parametrize(
    "init_lr,max_lr,min_lr,warmup,decay,style",
    [
        (6e-5, 6e-4, 0.0, 700, 18500, "cosine"),  # the seed's recipe
        (1e-4, 1e-3, 1e-5, 10, 100, "cosine"),
        (0.0, 1e-3, 1e-4, 10, 100, "linear"),
        (1e-4, 1e-3, 0.0, 10, 100, "constant"),
        (1e-4, 1e-3, 1e-5, 10, 100, "inverse-square-root"),
        (1e-3, 1e-3, 0.0, 0, 50, "cosine"),
    ],
)
def test_schedule_equals_megatron_scheduler(init_lr, max_lr, min_lr, warmup, decay, style):
    n = decay + 20 if decay < 1000 else decay + 5
    ref = reference_lrs(init_lr, max_lr, min_lr, warmup, decay, style, n)
    s = LRSchedule(init_lr, max_lr, min_lr, warmup, decay, style)
    ours_exact = np.array([s.value(k) for k in range(n + 1)])
    np.testing.assert_allclose(ours_exact, ref, rtol=1e-12, atol=1e-15)
    # The in-graph float32 schedule that optax applies.
    ours_jax = np.array(s(np.arange(n + 1)))
    np.testing.assert_allclose(ours_jax, ref, rtol=2e-5, atol=1e-9)


def test_seed_log_first_steps():
    """The seed's log prints lr 6.08e-05, 6.15e-05, 6.23e-05 for steps 1..3 (after each scheduler step)."""
    s = LRSchedule(6e-5, 6e-4, 0.0, 700, 18500, "cosine")
    assert [f"{s.value(k):.2e}" for k in (1, 2, 3, 4, 5)] == ["6.08e-05", "6.15e-05", "6.23e-05", "6.31e-05", "6.39e-05"]


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="lr_decay_style"):
        LRSchedule(0.0, 1e-3, 0.0, 10, 100, "exp")
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        LRSchedule(0.0, 1e-3, 0.0, 100, 100, "cosine")
    assert math.isfinite(float(LRSchedule(0.0, 1e-3, 0.0, 0, 10, "cosine")(3)))


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "inverse-square-root"])
def test_schedule_on_traced_numbers_is_the_float32_schedule(style):
    """The train step takes the schedule's numbers as an argument: its float32 learning rates are
    those of the schedule compiled with its numbers folded in as constants, to 2 ulps (XLA turns a
    division by a constant into a multiplication), and as close to Megatron's float64 ones."""
    import jax

    s = LRSchedule(6e-5, 6e-4, 6e-6, 70, 1850, style)
    steps = np.arange(1900)
    traced = np.asarray(jax.jit(lambda k, numbers: s(k, numbers))(steps, s.numbers()), np.float64)
    folded = np.asarray(jax.jit(s)(steps), np.float64)
    exact = np.array([s.value(k) for k in steps])
    ulp = np.spacing(np.float32(exact)).astype(np.float64)
    assert (np.abs(traced - folded) <= 2 * ulp).all()
    assert np.abs(traced - exact).max() <= np.abs(folded - exact).max() + 2 * ulp.max()
    np.testing.assert_allclose(traced, exact, rtol=2e-5, atol=1e-9)


def test_one_compiled_train_step_serves_every_schedule():
    """Two runs that differ only in lr, warmup and max_steps lower to the same program (one entry of
    the persistent compilation cache), and each still applies its own learning rate: AdamW's first
    update is lr x (m / (sqrt(v) + eps) + wd x p), so twice the init_lr moves every weight twice as far."""
    import jax
    import jax.numpy as jnp

    from tiny_training import tiny_training

    *_, a, batch = tiny_training(4, max_steps=100, lr=1e-3, warmup=10)
    *_, b, _ = tiny_training(4, max_steps=37, lr=2e-3, warmup=3)
    step0 = jnp.int32(0)
    assert a.train_step.lower(a.state, batch, step0).as_text() == b.train_step.lower(b.state, batch, step0).as_text()
    before = [np.array(x) for x in jax.tree.leaves(a.state["params"])]
    moved = {}
    for name, t in (("a", a), ("b", b)):
        after, _ = t.train_step(t.state, batch, step0)
        moved[name] = [np.array(x) - p for x, p in zip(jax.tree.leaves(after["params"]), before)]
    for p, da, db in zip(before, moved["a"], moved["b"]):  # to the rounding of p + delta
        assert (np.abs(db - 2 * da) <= 1e-3 * np.abs(2 * da) + 4 * np.spacing(np.abs(p))).all()
        assert np.abs(da).min() > 0
