"""The jitted train and eval steps: micro-batch gradient accumulation, masked CE, clipping, AdamW.

The whole optimizer step is one XLA program: the global batch arrives sharded over the data axes,
is split into `grad_accum` micro-batches that stay on the devices that hold them, gradients are summed
in float32 by a `lax.scan`, and the update is applied to the FSDP-sharded parameters and moments.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpretrain.train import loss as loss_lib
from jaxpretrain.train.loss import IGNORE_INDEX

masked_ce_sum = loss_lib.masked_ce_sum_from_logits  # the plain loss on logits (kept for callers)


def model_ce_sum(model, micro, *, chunk_size: int | None, deterministic: bool, rngs=None):
    """The model's summed float32 CE and label-token count on a micro-batch.

    chunk_size: sequence positions per chunk of the chunked loss (train/loss.py), which never holds
    the whole micro-batch's float32 logits; None or 0: the plain loss on the model's full logits.
    """
    if not chunk_size:
        logits = model(micro["input_ids"], deterministic=deterministic, rngs=rngs)
        return loss_lib.masked_ce_sum_from_logits(logits, micro["labels"])
    h = model.hidden_states(micro["input_ids"], deterministic=deterministic, rngs=rngs)
    w, vocab_size = model.head_weights()
    return loss_lib.masked_ce_sum(h, w, micro["labels"], vocab_size=vocab_size, chunk_size=chunk_size)


def num_label_tokens(labels: jax.Array) -> jax.Array:
    return jnp.sum(labels != IGNORE_INDEX)


def split_microbatches(x: jax.Array, grad_accum: int, mesh, data_axes) -> jax.Array:
    """[G, ...] -> [grad_accum, G // grad_accum, ...] without moving data between devices.

    Micro-batch m takes rows m, m + A, m + 2A, ... : every device holds G / (D * A) rows of each
    micro-batch, so no device idles and nothing is resharded. Which rows form a micro-batch does not
    change the result: the loss is a sum over the whole global batch divided by its label tokens.
    """
    g = x.shape[0]
    x = x.reshape(g // grad_accum, grad_accum, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    spec = P(None, data_axes, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def schedule_count(opt_state, default):
    """Updates applied so far, as the LR schedule counts them (equal to the step unless steps were
    skipped for a non-finite loss), so the logged LR is the one the next update uses."""
    counts = [
        value for path, value in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
        if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"
    ]
    return counts[-1] if counts else jnp.asarray(default, jnp.int32)


class TrainStep:
    """`train_step(state, batch, step) -> (state, metrics)`: the jitted step with the schedules'
    numbers bound (`numbers`: {"lr": ..., "wd": ...}, already on the devices). `lower` takes the same
    arguments, for ahead-of-time compilation and cost analysis."""

    def __init__(self, jitted, numbers):
        self.jitted, self.numbers = jitted, numbers

    def __call__(self, state, batch, step):
        return self.jitted(state, batch, step, self.numbers)

    def lower(self, state, batch, step):
        return self.jitted.lower(state, batch, step, self.numbers)


def make_train_step(
    graphdef,
    rest,
    optimizer_for: Callable[..., optax.GradientTransformation],
    lr_schedule,
    *,
    wd_schedule=None,
    mesh,
    data_axes,
    grad_accum: int,
    max_grad_norm: float,
    dropout_seed: int,
    deterministic: bool,
    state_shardings: Any,
    batch_sharding: NamedSharding,
    loss_chunk_size: int | None = None,
):
    """Returns a `TrainStep`: `train_step(state, batch, step) -> (state, metrics)`, jitted with donated state.

    `state` is {"params": nnx.State, "opt_state": optax state}; `step` is the 0-based optimizer step,
    which keys dropout (fold_in(seed, step, micro)) so a resumed run draws the same masks.
    `optimizer_for(schedule, weight_decay)` builds the optimizer around a learning-rate schedule and
    this update's weight decay; `lr_schedule` and `wd_schedule` (train/schedule.py; None: the
    optimizer's constant weight decay) enter the program through their numbers, an argument of the
    step, so the compiled step (and the persistent compilation cache's entry) does not depend on them.
    """

    def loss_fn(params, micro, key, denom):
        model = nnx.merge(graphdef, params, rest)
        ce_sum, _ = model_ce_sum(model, micro, chunk_size=loss_chunk_size, deterministic=deterministic, rngs=key)
        return ce_sum / denom

    def step_body(state, batch, step, numbers):
        # This update's weight decay, at the count the LR schedule is called with (updates done so far).
        weight_decay = None if wd_schedule is None else wd_schedule(schedule_count(state["opt_state"], step), numbers["wd"])
        optimizer = optimizer_for(lambda count: lr_schedule(count, numbers["lr"]), weight_decay)
        params = state["params"]
        denom = jnp.maximum(num_label_tokens(batch["labels"]), 1).astype(jnp.float32)
        micro = {k: split_microbatches(v, grad_accum, mesh, data_axes) for k, v in batch.items()}
        step_key = jax.random.fold_in(jax.random.key(dropout_seed), step)

        def accumulate(carry, xs):
            grads_sum, loss_sum = carry
            mb, i = xs
            loss, grads = jax.value_and_grad(loss_fn)(params, mb, jax.random.fold_in(step_key, i), denom)
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
            # Pinned to the parameters' shardings: left alone, XLA may keep whole gradients per device.
            grads_sum = jax.lax.with_sharding_constraint(grads_sum, state_shardings["params"])
            return (grads_sum, loss_sum + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, state_shardings["params"])
        (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(grad_accum)))

        grad_norm = optax.global_norm(grads)
        if max_grad_norm and max_grad_norm > 0:
            # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
            scale = jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        # A non-finite loss or gradient norm never reaches the state: the step keeps the old
        # parameters and moments (and update count, so the LR schedule waits too). Elementwise, fused
        # into the update: no extra memory and no host sync; the host reads `finite` with the loss.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "num_label_tokens": denom.astype(jnp.int32), "finite": finite,
            "updates": schedule_count(new_state["opt_state"], step + 1),
        }
        return new_state, metrics

    def train_step(state, batch, step, numbers):  # the name profiles and compile logs show: jit(train_step)
        # Under the mesh, the model's logical activation constraints (parallel.constrain) apply.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_body(state, batch, step, numbers)

    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding, None, replicated),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    numbers = {"lr": lr_schedule.numbers(), "wd": {} if wd_schedule is None else wd_schedule.numbers()}
    return TrainStep(jitted, jax.device_put(numbers, replicated))


def make_eval_step(graphdef, rest, *, mesh, param_shardings, batch_sharding, loss_chunk_size: int | None = None):
    """Returns `eval_step(params, batch) -> (summed CE, label tokens)`, dropout off."""

    def eval_step(params, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            model = nnx.merge(graphdef, params, rest)
            return model_ce_sum(model, batch, chunk_size=loss_chunk_size, deterministic=True)

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding))
