"""The pieces behind the fault handling, in-process: the jitted step's guard against non-finite
updates, the memory estimate against an injected device limit, the skip counter, storage errors as
Orbax raises them, and metrics files a killed run left behind."""

from __future__ import annotations

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpretrain.errors import UserError
from tiny_training import tiny_training


@pytest.fixture(scope="module")
def training():
    """The real train step of a tiny GPT-2 (vocab 512) on one CPU device."""
    return tiny_training()


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_a_nonfinite_step_leaves_the_state_bit_for_bit_unchanged(training):
    _, _, _, t, batch = training
    good = jax.tree.map(jnp.copy, t.state)
    poisoned = jax.tree.map(jnp.copy, good)
    leaves, treedef = jax.tree.flatten(poisoned["params"])
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)  # one NaN weight: loss and gradients NaN
    poisoned["params"] = jax.tree.unflatten(treedef, leaves)
    before = _copy(poisoned)
    after, m = t.train_step(poisoned, batch, jnp.int32(0))
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    assert int(m["updates"]) == 0  # the LR schedule waits too
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.array(a), b), after, before)

    # A finite step is applied as before: parameters move and the update count advances.
    before = _copy(good)
    after, m = t.train_step(good, batch, jnp.int32(0))
    assert bool(m["finite"]) and int(m["updates"]) == 1
    moved = [not np.array_equal(np.array(a), b) for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]))]
    assert all(moved)


def test_memory_check_against_an_injected_limit(training):
    from jaxpretrain.train import memory

    cfg, mesh, plan, t, batch = training
    compiled = t.train_step.lower(t.state, batch, jnp.int32(0)).compile()
    need = memory.StepMemory.of(compiled)
    # XLA's estimate covers at least the state it is handed (parameters + two AdamW moments, float32).
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(t.state))
    assert need.arguments >= state_bytes and need.total >= state_bytes
    device = jax.local_devices()[0]
    assert memory.device_limit(device) is None  # CPU: no limit reported, so nothing is refused
    assert memory.check_fits(compiled, device, advice="x") == need
    assert memory.check_fits(compiled, device, limit=need.total, advice="x") == need  # exactly enough
    with pytest.raises(UserError) as info:
        memory.check_fits(compiled, device, limit=need.total - 1, advice="lower it")
    message = str(info.value)
    assert message.startswith("step_scheduler.local_batch_size: the train step needs about ")
    assert f"needs about {memory.size(need.total)} per device" in message and message.endswith("; lower it")
    assert memory.size(3 * 2**30) == "3.00 GiB" and memory.size(5 * 2**20) == "5.0 MiB"


def test_guard_counts_skips_in_a_row_and_resets_on_a_finite_step(caplog):
    from jaxpretrain.train.numerics import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(2)
    assert guard.check(1, 1.0, 1.0, True, "kept") is False
    assert guard.check(2, float("nan"), 1.0, False, "kept") is True
    assert guard.check(3, 1.0, float("inf"), False, "kept") is True
    assert guard.check(4, 1.0, 1.0, True, "kept") is False  # a good step resets the run of skips
    assert guard.check(5, float("nan"), float("nan"), False, "kept") is True
    assert guard.check(6, float("nan"), float("nan"), False, "kept") is True
    with pytest.raises(NonFiniteError, match=r"^step 7: loss nan / grad_norm nan is not finite; stopped without saving \(3 steps in a row"):
        guard.check(7, float("nan"), float("nan"), False, "the last checkpoint, step 4, is kept")
    with pytest.raises(NonFiniteError, match="set optimizer.skip_nonfinite_steps=N"):
        NonFiniteGuard(0).check(1, float("nan"), 0.0, False, "kept")
    with pytest.raises(UserError, match="optimizer.skip_nonfinite_steps"):
        NonFiniteGuard(-1)


def test_all_finite_sees_one_bad_value_among_sharded_leaves():
    from jaxpretrain.train.numerics import all_finite

    tree = {"a": jnp.ones((3, 4)), "b": [jnp.zeros(5), jnp.arange(3)], "c": jnp.ones((), jnp.bfloat16)}
    assert all_finite(tree)
    tree["b"][0] = tree["b"][0].at[2].set(jnp.inf)
    assert not all_finite(tree)


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (ValueError('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database ... Failed to write 2555904 bytes '
                    "to file 6: No space left on device [os_error_code='28']"), "No space left on device"),
        (ValueError("... Failed to create directory: Read-only file system [os_error_code=30]"), "Read-only file system"),
        (RuntimeError("wrapped"), None),
        (ValueError("shape mismatch"), None),
    ],
)
def test_storage_problem_in_orbax_and_os_errors(error, expected):
    from jaxpretrain.train.checkpoint import storage_problem

    assert storage_problem(error) == expected
    outer = RuntimeError("outer")
    outer.__cause__ = error
    assert storage_problem(outer) == expected


def test_metrics_of_a_killed_run_are_cut_back_to_the_resumed_step(tmp_path):
    from jaxpretrain.train.metrics import MetricSinks

    run_dir = tmp_path / "logs"
    run_dir.mkdir()
    with open(run_dir / "train.jsonl", "w") as f:
        for step in range(1, 8):
            f.write(json.dumps({"step": step, "loss": 10.0 - step}) + "\n")
        f.write('{"step": 8, "lo')  # killed mid-line
    sinks = MetricSinks(str(run_dir), enabled=True, resume_step=6)
    sinks.log("train", 7, {"loss": 3.5})
    sinks.close()
    with open(run_dir / "train.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in records] == [(s, 10.0 - s) for s in range(1, 7)] + [(7, 3.5)]
    # A fresh run (no checkpoint to resume) only repairs a torn line.
    with open(run_dir / "train.jsonl", "a") as f:
        f.write('{"step": 9')
    MetricSinks(str(run_dir), enabled=True).close()
    with open(run_dir / "train.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6, 7]


def test_metrics_on_a_full_disk_are_one_line_naming_the_file(tmp_path):
    from jaxpretrain.train.metrics import MetricSinks

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    run_dir = tmp_path / "logs"
    run_dir.mkdir()
    os.symlink("/dev/full", run_dir / "train.jsonl")  # every write: ENOSPC
    sinks = MetricSinks(str(run_dir), enabled=True, resume_step=0)
    with pytest.raises(UserError) as info:
        sinks.log("train", 1, {"loss": 1.0})
    assert str(info.value) == f"{run_dir / 'train.jsonl'}: cannot write metrics (No space left on device)"
