"""The LR schedule against NeMo Automodel's own OptimizerParamScheduler, step by step."""

import math

import numpy as np
import pytest
import torch
from nemo_automodel.components.optim.scheduler import OptimizerParamScheduler

from jaxpretrain.train.schedule import LRSchedule, WeightDecaySchedule


def reference_schedule(init_lr, max_lr, min_lr, warmup, decay, style, n_steps, **kwargs):
    """The lr and weight decay torch's optimizer holds after 0..n_steps scheduler steps, as the recipe
    drives it. kwargs: the scheduler's WSD and weight-decay arguments (default: a constant 0.1)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    kwargs = {"start_wd": 0.1, "end_wd": 0.1, "wd_incr_steps": decay, "wd_incr_style": "constant", **kwargs}
    sched = OptimizerParamScheduler(
        opt, init_lr=init_lr, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
        lr_decay_style=style, **kwargs,
    )
    lrs, wds = [opt.param_groups[0]["lr"]], [opt.param_groups[0]["weight_decay"]]
    for _ in range(n_steps):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(opt.param_groups[0]["weight_decay"])
    return np.array(lrs), np.array(wds)


def reference_lrs(*args):
    return reference_schedule(*args)[0]


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


@pytest.mark.parametrize("wsd_style", ["linear", "cosine", "exponential", "minus_sqrt"])
@pytest.mark.parametrize("warmup,decay,wsd_steps", [(10, 100, 30), (0, 50, 50), (5, 40, 60)])
def test_wsd_equals_megatron_scheduler(wsd_style, warmup, decay, wsd_steps):
    """Warmup-stable-decay: max_lr until the anneal over the decay's last wsd_steps (longer than the
    decay in the last case: the anneal is already under way when the warmup ends), then min_lr."""
    n = decay + 15
    ref, _ = reference_schedule(1e-4, 1e-3, 1e-5, warmup, decay, "WSD", n, wsd_decay_steps=wsd_steps, lr_wsd_decay_style=wsd_style)
    assert len(set(np.round(ref, 12))) > 3  # warmup, plateau, anneal and floor: not a constant
    s = LRSchedule(1e-4, 1e-3, 1e-5, warmup, decay, "WSD", wsd_steps, wsd_style)
    np.testing.assert_allclose([s.value(k) for k in range(n + 1)], ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.array(s(np.arange(n + 1))), ref, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize(
    "start_wd,end_wd,incr_steps,style",
    [(0.0, 0.1, 40, "linear"), (0.01, 0.3, 40, "cosine"), (0.05, 0.05, 40, "constant"), (0.0, 0.2, 25, "linear")],
)
def test_weight_decay_equals_megatron_scheduler(start_wd, end_wd, incr_steps, style):
    """The weight decay torch's AdamW is given after each scheduler step (past incr_steps: end_wd)."""
    n = 60
    _, ref = reference_schedule(1e-4, 1e-3, 0.0, 5, 50, "cosine", n, start_wd=start_wd, end_wd=end_wd,
                                wd_incr_steps=incr_steps, wd_incr_style=style)
    w = WeightDecaySchedule(start_wd, end_wd, incr_steps, style)
    np.testing.assert_allclose([w.value(k) for k in range(n + 1)], ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.array(w(np.arange(n + 1))), ref, rtol=2e-6, atol=1e-9)
    import jax  # on the train step's traced numbers too

    traced = np.asarray(jax.jit(lambda k, numbers: w(k, numbers))(np.arange(n + 1), w.numbers()))
    np.testing.assert_allclose(traced, ref, rtol=2e-6, atol=1e-9)


def test_bad_wsd_and_weight_decay_schedules_are_rejected():
    with pytest.raises(ValueError, match="lr_scheduler.lr_wsd_decay_style: None is not one of linear"):
        LRSchedule(0.0, 1e-3, 0.0, 10, 100, "WSD", 20, None)
    with pytest.raises(ValueError, match="lr_scheduler.wsd_decay_steps: None is not a positive"):
        LRSchedule(0.0, 1e-3, 0.0, 10, 100, "WSD", None, "linear")
    with pytest.raises(ValueError, match="lr_scheduler.wd_incr_style: 'exp' is not one of constant"):
        WeightDecaySchedule(0.0, 0.1, 10, "exp")
    with pytest.raises(ValueError, match="lr_scheduler.start_wd: 0.2 is not between 0 and end_wd"):
        WeightDecaySchedule(0.2, 0.1, 10, "linear")
    with pytest.raises(ValueError, match="constant, but start_wd 0 differs from end_wd 0.1"):
        WeightDecaySchedule(0.0, 0.1, 10, "constant")


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


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "inverse-square-root", "WSD"])
def test_schedule_on_traced_numbers_is_the_float32_schedule(style):
    """The train step takes the schedule's numbers as an argument: its float32 learning rates are
    those of the schedule compiled with its numbers folded in as constants, to 2 ulps (XLA turns a
    division by a constant into a multiplication), and as close to Megatron's float64 ones."""
    import jax

    s = LRSchedule(6e-5, 6e-4, 6e-6, 70, 1850, style, *((400, "cosine") if style == "WSD" else ()))
    steps = np.arange(1900)
    traced = np.asarray(jax.jit(lambda k, numbers: s(k, numbers))(steps, s.numbers()), np.float64)
    folded = np.asarray(jax.jit(s)(steps), np.float64)
    exact = np.array([s.value(k) for k in steps])
    ulp = np.spacing(np.float32(exact)).astype(np.float64)
    assert (np.abs(traced - folded) <= 2 * ulp).all()
    assert np.abs(traced - exact).max() <= np.abs(folded - exact).max() + 2 * ulp.max()
    np.testing.assert_allclose(traced, exact, rtol=2e-5, atol=1e-9)


def test_one_compiled_train_step_serves_every_schedule():
    """Two runs that differ only in lr, warmup and max_steps (or weight decay) lower to the same
    program (one entry of the persistent compilation cache), and each still applies its own learning
    rate: AdamW's first update is lr x (m / (sqrt(v) + eps) + wd x p), so twice the init_lr moves
    every weight twice as far."""
    import jax
    import jax.numpy as jnp

    from tiny_training import tiny_training

    *_, a, batch = tiny_training(4, max_steps=100, lr=1e-3, warmup=10)
    *_, b, _ = tiny_training(4, max_steps=37, lr=2e-3, warmup=3)
    *_, c, _ = tiny_training(4, max_steps=100, lr=1e-3, warmup=10, weight_decay=0.03)
    step0 = jnp.int32(0)
    text = a.train_step.lower(a.state, batch, step0).as_text()
    assert text == b.train_step.lower(b.state, batch, step0).as_text() == c.train_step.lower(c.state, batch, step0).as_text()
    before = [np.array(x) for x in jax.tree.leaves(a.state["params"])]
    moved = {}
    for name, t in (("a", a), ("b", b)):
        after, _ = t.train_step(t.state, batch, step0)
        moved[name] = [np.array(x) - p for x, p in zip(jax.tree.leaves(after["params"]), before)]
    for p, da, db in zip(before, moved["a"], moved["b"]):  # to the rounding of p + delta
        assert (np.abs(db - 2 * da) <= 1e-3 * np.abs(2 * da) + 4 * np.spacing(np.abs(p))).all()
        assert np.abs(da).min() > 0


RECIPE_HEAD = """model:
  config:
    pretrained_model_name_or_path: gpt2
step_scheduler:
  max_steps: 60
optimizer:
  _target_: torch.optim.AdamW
  lr: 3.0e-4
"""


@pytest.mark.parametrize(
    "section",
    [
        None,  # no scheduler in NeMo: a constant lr
        {},
        {"lr_decay_style": "cosine"},  # NeMo's min_lr (0.01 x lr) and warmup (max_steps // 10), not the seed's
        {"lr_warmup_steps": 7, "lr_decay_style": "linear", "min_lr": 0.0, "max_lr": 5.0e-4,
         "override_opt_param_scheduler": True, "use_checkpoint_opt_param_scheduler": False},
        {"lr_decay_style": "WSD", "wsd_decay_steps": 20, "lr_wsd_decay_style": "cosine", "start_wd": 0.0,
         "end_wd": 0.2, "wd_incr_style": "linear", "wd_incr_steps": 30},
    ],
    ids=["absent", "empty", "style-only", "linear-max_lr", "wsd-wd"],
)
def test_a_recipe_yaml_schedules_as_nemo_builds_it(tmp_path, section):
    """A NeMo recipe YAML's lr_scheduler section, read by our config layer, gives the learning rates
    and weight decays of NeMo Automodel's own `LRSchedulerConfig(**section).build(...)` at every step."""
    import types

    import yaml
    from nemo_automodel.components.optim.optimizer import LRSchedulerConfig

    from jaxpretrain.config import cli, finalize
    from jaxpretrain.train.schedule import from_config, wd_from_config

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_HEAD + ("" if section is None else yaml.safe_dump({"lr_scheduler": section})))
    cfg = cli.parse(["--config", str(path)], prog="train", description="").cfg
    finalize(cfg)
    lr_schedule, wd_schedule = from_config(cfg), wd_from_config(cfg)

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)  # weight_decay: torch's default
    schedulers = LRSchedulerConfig(**section).build(opt, types.SimpleNamespace(epoch_len=None, num_epochs=1, max_steps=60)) if section else []
    lrs, wds = [], []
    for _ in range(66):
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(opt.param_groups[0]["weight_decay"])
        for sched in schedulers:
            sched.step(1)
    np.testing.assert_allclose([lr_schedule.value(k) for k in range(66)], lrs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([wd_schedule.value(k) for k in range(66)], wds, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "step_scheduler, epoch_len",
    [
        ({"max_steps": 60, "num_epochs": 3}, 17),  # the epochs end first: NeMo schedules over 51 steps
        ({"num_epochs": 2}, 23),  # no max_steps: NeMo's full-epoch training, 2 x 23 steps
        ({"max_steps": 30, "num_epochs": 3}, 17),
    ],
    ids=["epochs-end-first", "no-max-steps", "max-steps-first"],
)
@pytest.mark.parametrize("section", [{"lr_decay_style": "cosine"},  # (an empty section: no scheduler in NeMo)
                                     {"lr_decay_style": "linear", "start_wd": 0.0, "end_wd": 0.1, "wd_incr_style": "linear"}],
                         ids=["nemo-defaults", "linear-wd"])
def test_unset_lengths_follow_the_run_as_nemo_schedules_them(tmp_path, step_scheduler, epoch_len, section):
    """Warmup, decay and weight-decay lengths the YAML leaves out follow the run's length as NeMo's
    `LRSchedulerConfig.build` takes it from its StepScheduler: min(max_steps, epochs x epoch length),
    or epochs x epoch length without max_steps. NeMo's StepScheduler is built from the same section
    over a dataloader of that epoch length; ours takes the length from train/cadence.py."""
    import yaml
    from nemo_automodel.components.optim.optimizer import LRSchedulerConfig
    from nemo_automodel.components.training.step_scheduler import StepSchedulerConfig

    from jaxpretrain.config import cli, finalize
    from jaxpretrain.train import cadence
    from jaxpretrain.train.schedule import from_config, wd_from_config

    head = {"model": {"config": {"pretrained_model_name_or_path": "gpt2"}},
            "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3.0e-4},
            "step_scheduler": {"global_batch_size": 4, "local_batch_size": 4, **step_scheduler}, "lr_scheduler": section}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(head))
    cfg = cli.parse(["--config", str(path)], prog="train", description="").cfg
    finalize(cfg)
    ss = cfg.step_scheduler
    total = cadence.total_steps(ss.max_steps, epoch_len, ss.num_epochs)
    lr_schedule, wd_schedule = from_config(cfg, total), wd_from_config(cfg, total)

    nemo_steps = StepSchedulerConfig(global_batch_size=4, **step_scheduler, preemption_signal=None).build(
        dataloader=list(range(epoch_len)), dp_group_size=1, local_batch_size=4)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    (sched,) = LRSchedulerConfig(**section).build(opt, nemo_steps)
    assert total == min(nemo_steps.max_steps, nemo_steps.num_epochs * nemo_steps.epoch_len)
    assert (lr_schedule.warmup_steps, lr_schedule.decay_steps) == (sched.lr_warmup_steps, sched.lr_decay_steps)
    lrs, wds = [], []
    for _ in range(total + 3):
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(opt.param_groups[0]["weight_decay"])
        sched.step(1)
    np.testing.assert_allclose([lr_schedule.value(k) for k in range(total + 3)], lrs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose([wd_schedule.value(k) for k in range(total + 3)], wds, rtol=1e-12, atol=1e-15)
