"""The pretraining recipe: mesh, data, model, optimizer, checkpoints, then the train/validation loop.

This is the one place that wires the data path, the model, the mesh and the optimizer together
(DESIGN.md, "Layers"). Sections follow big_vision's train.py: each titled, each short.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import importlib.metadata
import logging
import math
import os
import signal
import socket
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxpretrain.model as M
from jaxpretrain import parallel
from jaxpretrain.data import build_gpt_datasets
from jaxpretrain.data.loader import make_loader
from jaxpretrain.errors import UserError
from jaxpretrain.train import metrics as metrics_lib
from jaxpretrain.train import schedule as schedule_lib
from jaxpretrain.train.checkpoint import TrainCheckpointer
from jaxpretrain.train.optim import build_optimizer
from jaxpretrain.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxpretrain")

DATA_AXES = ("replicate", "fsdp")  # mesh axes the batch is split over
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "transformers", "ml-collections")


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples divide over data-parallel ranks and micro-batches."""

    global_batch_size: int
    local_batch_size: int
    dp_size: int
    grad_accum: int
    max_steps: int
    train_samples: int
    val_samples: int
    val_batch_size: int


def plan_batches(cfg, dp_size: int) -> BatchPlan:
    ss = cfg.step_scheduler
    g, l = int(ss.global_batch_size), int(ss.local_batch_size)
    if g <= 0 or l <= 0 or g % (l * dp_size):
        raise UserError(
            f"step_scheduler.global_batch_size: {g} is not a multiple of local_batch_size ({l}) x "
            f"data-parallel size ({dp_size})"
        )
    if ss.max_steps <= 0:
        raise UserError("step_scheduler.max_steps: must be positive")
    train_samples = cfg.dataset.num_train_samples or ss.max_steps * g
    val_samples = cfg.validation_dataset.num_val_samples or (ss.max_steps // ss.val_every_steps) * g
    val_batch = cfg.validation_dataset.global_batch_size or l * dp_size
    if val_batch % dp_size:
        raise UserError(f"validation_dataset.global_batch_size: {val_batch} is not a multiple of dp size {dp_size}")
    if 0 < val_samples < val_batch:
        raise UserError(f"validation_dataset.num_val_samples: {val_samples} is fewer than one validation batch ({val_batch})")
    return BatchPlan(g, l, dp_size, g // (l * dp_size), int(ss.max_steps), int(train_samples), int(val_samples), int(val_batch))


# ---------------------------------------------------------------------------------------------- model


def model_config(cfg):
    m = cfg.model
    overrides = {k: m[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size") if m[k] is not None}
    if m.dropout is not None:
        overrides.update(embd_pdrop=m.dropout, attn_pdrop=m.dropout, resid_pdrop=m.dropout)
    hf_config = M.config_from(m.pretrained_model_name_or_path, **overrides)
    if hf_config.n_positions < cfg.dataset.seq_length:
        raise UserError(
            f"dataset.seq_length: {cfg.dataset.seq_length} exceeds the model's n_positions ({hf_config.n_positions})"
        )
    return hf_config


def build_model(cfg, hf_config, mesh):
    kw = dict(
        dtype=jnp.dtype(cfg.model.dtype),
        attention_impl=cfg.model.attention_impl,
        vocab_multiple=int(cfg.model.vocab_multiple),
        remat=(cfg.model.remat_policy or True) if cfg.model.remat else False,
        scan_layers=bool(cfg.model.scan_layers),
    )
    if cfg.model.load_weights:
        return M.from_pretrained(cfg.model.pretrained_model_name_or_path, mesh=mesh, config=hf_config, **kw)
    return M.create_model(hf_config, mesh=mesh, seed=int(cfg.rng.seed), **kw)


def dropout_active(hf_config) -> bool:
    return any(getattr(hf_config, k, 0.0) > 0 for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop"))


@dataclasses.dataclass
class Training:
    """Everything a train step needs, shared by the recipe and the benchmark."""

    hf_config: object
    graphdef: object
    rest: object
    state: dict
    state_shardings: dict
    lr_schedule: schedule_lib.LRSchedule
    train_step: object
    n_params: int
    n_params_no_pos: int

    def flops_per_token(self, seq_len: int) -> float:
        c = self.hf_config
        return metrics_lib.flops_per_token(
            n_params_no_pos=self.n_params_no_pos, n_layer=c.n_layer, n_head=c.n_head, head_dim=c.n_embd // c.n_head, seq_len=seq_len
        )


def build_training(cfg, mesh, plan: BatchPlan, hf_config=None) -> Training:
    hf_config = hf_config or model_config(cfg)
    model = build_model(cfg, hf_config, mesh)
    n_params = M.param_count(model)
    n_params_no_pos = n_params - hf_config.n_positions * hf_config.n_embd  # what MFU counts
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    lr_schedule = schedule_lib.from_config(cfg)
    optimizer = build_optimizer(cfg, lr_schedule)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    # AdamW's moments take their parameter's sharding; scalars (the update count) are replicated.
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
    )
    state = {"params": params, "opt_state": jax.jit(optimizer.init, out_shardings=opt_shardings)(params)}
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings}
    train_step = make_train_step(
        graphdef, rest, optimizer, mesh=mesh, data_axes=DATA_AXES, grad_accum=plan.grad_accum,
        max_grad_norm=float(cfg.optimizer.max_grad_norm), dropout_seed=int(cfg.rng.seed),
        deterministic=not dropout_active(hf_config), state_shardings=state_shardings,
        batch_sharding=parallel.batch_sharding(mesh), loss_chunk_size=loss_chunk_size(cfg),
    )
    return Training(hf_config, graphdef, rest, state, state_shardings, lr_schedule, train_step, n_params, n_params_no_pos)


def loss_chunk_size(cfg) -> int:
    chunk = cfg.loss_fn.get("chunk_size", 0) or 0
    if not isinstance(chunk, int) or chunk < 0:
        raise UserError(f"loss_fn.chunk_size: must be a whole number >= 0 (0: the plain loss), got {chunk!r}")
    return chunk


def make_mesh(cfg):
    d = cfg.distributed
    if d.cp_size != 1 or d.sequence_parallel:
        raise UserError("distributed.cp_size / sequence_parallel: context and sequence parallelism are not supported")
    devices = jax.devices()
    if d.dp_size is not None and d.dp_size * d.tp_size < len(devices):
        # A smaller run on the first devices (one process only: every process must own mesh devices).
        if jax.process_count() > 1:
            raise UserError(f"distributed.dp_size: {d.dp_size} x tp_size {d.tp_size} must use all {len(devices)} devices of a multi-process run")
        devices = devices[: d.dp_size * d.tp_size]
    return parallel.make_mesh(
        dp_replicate_size=int(d.dp_replicate_size), dp_shard_size=_shard_size(d), tp_size=int(d.tp_size), devices=devices
    )


# -------------------------------------------------------------------------------------------- logging


def setup_logging() -> None:
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def log_experiment(cfg, mesh, plan: BatchPlan, n_params: int, l2: float, datasets) -> None:
    log.info("Experiment_details:")
    log.info("Timestamp: '%s'", datetime.datetime.now().isoformat(timespec="seconds"))
    log.info("User: %s", getpass.getuser())
    log.info("Host: %s", socket.gethostname())
    log.info("World size: %d processes, %d devices (%s)", jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
    log.info("Mesh: %s", dict(mesh.shape))
    log.info("Recipe config:")
    for line in str(cfg).rstrip().splitlines():
        log.info("  %s", line)
    log.info("Library versions:")
    for name in LIBRARIES:
        try:
            log.info("- %s: %s", name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            pass
    log.info("Batches: global %d = local %d x dp %d x grad_accum %d", plan.global_batch_size, plan.local_batch_size, plan.dp_size, plan.grad_accum)
    log.info("Datasets: train %s samples, validation %s samples", *(len(d) if d is not None else None for d in datasets))
    log.info("Model summary:")
    log.info("Trainable parameters: {:,}".format(n_params))
    log.info("Total parameters: {:,}".format(n_params))
    log.info("Param L2 norm: %.4f", l2)


# ------------------------------------------------------------------------------------------ preemption


class StopSignal:
    """SIGTERM (SLURM's preemption notice) asks for a checkpoint and a clean exit.

    A Python handler sets a flag. One process: the flag is read after each step. Several processes
    (each signalled on its own, not at the same step) must all stop at the same step: the first to
    see its flag after step k publishes `k + LAG` under one key of jax.distributed's key-value store
    (first writer wins), and every process reads that key after each step (one small RPC to the
    coordinator, no device collective) and stops there. LAG = 2 is enough because no process can
    get past `should_stop(k + 2)` before every other one has finished `should_stop(k)`: before
    `should_stop(m)` the loop waits on step m - 1 (its metrics, or the validation/checkpoint of m - 1),
    which needs every process to have dispatched step m - 1, which each does after `should_stop(m - 2)`.

    JAX's own preemption sync service (`multihost_utils.reached_preemption_sync_point`) is not used:
    its step counter starts at 0 in every process, so a notice that arrives before the first step of
    a resumed run sets the sync point to step 1, which a run resumed at step N > 0 never reaches: it
    trains on, ignoring SIGTERM, until it is killed. Orbax's CheckpointManager also feeds it steps
    from its finalize thread. Our handler replaces the one jax.distributed installs, so build this
    right after joining the run.
    """

    LAG = 2
    _instances = 0  # one key per StopSignal in the run: every process builds them in the same order

    def __init__(self):
        self.received = False
        self.stop_at: int | None = None
        self._published = False
        signal.signal(signal.SIGTERM, self._handle)
        self._client = None
        if jax.process_count() > 1:
            from jax._src import distributed

            self._client = distributed.global_state.client
            self._dir = f"jaxpretrain/stop_signal/{StopSignal._instances}/"
            StopSignal._instances += 1

    def _handle(self, signum, frame):
        self.received = True

    def should_stop(self, step: int) -> bool:
        if self._client is None:
            return self.received
        if self.stop_at is None:
            if self.received and not self._published:
                self._published = True
                try:
                    self._client.key_value_set(self._dir + "at", str(step + self.LAG))
                except jax.errors.JaxRuntimeError as e:  # another process published first: theirs holds
                    if "ALREADY_EXISTS" not in str(e):
                        raise
            found = self._client.key_value_dir_get(self._dir)
            if found:
                self.stop_at = int(found[0][1])
                if step > self.stop_at:
                    raise RuntimeError(f"SIGTERM: step {self.stop_at} was agreed as the last step, but this process is at {step}")
                log.info("SIGTERM: every process stops after step %d", self.stop_at)
        return self.stop_at is not None and step >= self.stop_at


# ----------------------------------------------------------------------------------------------- main


def run(cfg) -> int:
    # -- Processes and mesh. Joining the run comes first: setup_logging asks for jax.process_index(),
    # which starts the XLA backend, after which jax.distributed.initialize refuses to run.
    parallel.initialize_distributed()
    stop = StopSignal()  # SIGTERM from here on saves and exits (jax.distributed's handler is replaced)
    setup_logging()
    mesh = make_mesh(cfg)
    dp_size = mesh.shape["replicate"] * mesh.shape["fsdp"]
    plan = plan_batches(cfg, dp_size)
    hf_config = model_config(cfg)  # checked before any data work: a bad shape fails in a second
    loss_chunk_size(cfg)  # likewise

    # -- Input: Megatron datasets and the per-process Grain loaders.
    ds_cfg, val_cfg = cfg.dataset, cfg.validation_dataset
    train_ds = build_gpt_datasets(
        ds_cfg.paths, seq_length=ds_cfg.seq_length, split=ds_cfg.split, seed=ds_cfg.seed,
        num_samples=(plan.train_samples, 0, 0), cache_dir=ds_cfg.index_mapping_dir,
    )[0]
    val_ds = None
    if plan.val_samples and cfg.step_scheduler.val_every_steps:
        val_ds = build_gpt_datasets(
            val_cfg.paths, seq_length=val_cfg.seq_length, split=val_cfg.split, seed=val_cfg.seed,
            num_samples=(0, plan.val_samples, 0), cache_dir=val_cfg.index_mapping_dir,
        )[1]
    steps_per_epoch = len(train_ds) // plan.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"dataset.paths: {len(train_ds)} train samples do not fill one global batch of {plan.global_batch_size}")
    total_steps = min(plan.max_steps, steps_per_epoch * int(cfg.step_scheduler.num_epochs))
    loader = make_loader(
        train_ds, global_batch_size=plan.global_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_batches=total_steps, worker_count=int(ds_cfg.worker_count), repeat=True,
    )
    batch_sharding = parallel.batch_sharding(mesh)

    # -- Model (built sharded) and optimizer (its state sharded like the parameters).
    t = build_training(cfg, mesh, plan, hf_config)
    state = t.state

    # -- Checkpoint: resume from the newest complete one.
    data_iter = iter(loader)
    ckpt = None
    start_step = 0
    if cfg.checkpoint.enabled:
        ckpt = TrainCheckpointer(
            cfg.checkpoint.checkpoint_dir, max_to_keep=int(cfg.checkpoint.max_to_keep), async_save=bool(cfg.checkpoint.async_save)
        )
        latest = ckpt.latest_step()
        if latest is not None:
            restored = ckpt.restore(latest, params=state["params"], opt_state=state["opt_state"], data_iterator=data_iter)
            state = {"params": restored["params"], "opt_state": restored["opt_state"]}
            start_step = latest
            log.info("Resumed from %s at step %d", os.path.join(ckpt.directory, str(latest)), latest)

    log_experiment(cfg, mesh, plan, t.n_params, float(M.param_l2_norm(state["params"])), (train_ds, val_ds))
    log.info(
        "LR schedule: init_lr %.6g max_lr %.6g min_lr %.6g warmup %d decay %d style %s",
        t.lr_schedule.init_lr, t.lr_schedule.max_lr, t.lr_schedule.min_lr, t.lr_schedule.warmup_steps,
        t.lr_schedule.decay_steps, t.lr_schedule.decay_style,
    )
    run_dir = cfg.logging.run_dir or os.path.join(cfg.checkpoint.checkpoint_dir, "logs")
    sinks = metrics_lib.MetricSinks(run_dir, enabled=jax.process_index() == 0, wandb_cfg=cfg.wandb, config_dict=cfg.to_dict())

    # -- Steps.
    eval_step = make_eval_step(t.graphdef, t.rest, mesh=mesh, param_shardings=t.state_shardings["params"], batch_sharding=batch_sharding,
                               loss_chunk_size=loss_chunk_size(cfg))

    seq_len = int(ds_cfg.seq_length)
    tokens_per_step = plan.global_batch_size * seq_len
    fpt = t.flops_per_token(seq_len)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0])
    n_dev = jax.device_count()
    ss = cfg.step_scheduler

    def validate(step: int) -> float:
        n_batches = plan.val_samples // plan.val_batch_size
        val_loader = make_loader(
            val_ds, global_batch_size=plan.val_batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), num_batches=n_batches,
        )
        ce_sum, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        for local in val_loader:
            c, n = eval_step(state["params"], parallel.make_global_batch(local, mesh))
            ce_sum, count = ce_sum + c, count + n
        loss, count = float(ce_sum) / max(int(count), 1), int(count)
        log.info(metrics_lib.format_val_line(step, (step - 1) // steps_per_epoch, loss, t.lr_schedule.value(step), count))
        sinks.log("validation", step, {"val_loss": loss, "num_label_tokens": count})
        return loss

    def save(step: int) -> None:
        if ckpt is None:
            return
        meta = {"step": step, "config": cfg.to_dict(), "model_config": t.hf_config.to_dict(), "tokenizer": ds_cfg.tokenizer}
        ckpt.save(step, params=state["params"], opt_state=state["opt_state"], data_iterator=data_iter, meta=meta)
        if cfg.checkpoint.save_consolidated:
            ckpt.wait()
            M.save_pretrained(nnx.merge(t.graphdef, state["params"], t.rest), os.path.join(ckpt.directory, f"hf_step_{step}"), tokenizer=ds_cfg.tokenizer)

    # Step k's metrics are read after step k+1 is dispatched, so the device never waits on the host.
    last_time = time.perf_counter()

    def report(step: int, device_metrics) -> None:
        nonlocal last_time
        m = jax.device_get(device_metrics)
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"step {step}: loss {loss} / grad_norm {grad_norm} is not finite")
        tps = tokens_per_step / dt
        mfu = tps * fpt / (peak * n_dev) if peak else None
        values = dict(loss=loss, grad_norm=grad_norm, lr=t.lr_schedule.value(step), mem=metrics_lib.peak_memory_gib(),
                      tps=tps, num_label_tokens=int(m["num_label_tokens"]))
        if step % int(cfg.logging.log_every_steps) == 0 or step == total_steps or step == start_step + 1:
            log.info(metrics_lib.format_step_line(
                step, (step - 1) // steps_per_epoch, values["loss"], values["grad_norm"], values["lr"], values["mem"],
                tps, n_dev, values["num_label_tokens"], mfu,
            ))
        sinks.log("train", step, values | ({"mfu": mfu} if mfu is not None else {}))

    if start_step >= total_steps:
        log.info("Nothing to do: the checkpoint is at step %d of %d", start_step, total_steps)
    pending = None
    for step in range(start_step + 1, total_steps + 1):
        batch = parallel.make_global_batch(next(data_iter), mesh)
        state, device_metrics = t.train_step(state, batch, jnp.int32(step - 1))
        if pending is not None:
            report(*pending)
        pending = (step, device_metrics)
        stopping = stop.should_stop(step)
        is_val = val_ds is not None and step % ss.val_every_steps == 0
        is_ckpt = step % ss.ckpt_every_steps == 0 or step == total_steps or stopping
        if is_val or is_ckpt:
            report(*pending)
            pending = None
            if is_val or (is_ckpt and val_ds is not None and not stopping):
                validate(step)
            if is_ckpt:
                save(step)
            last_time = time.perf_counter()
        if stopping:
            log.info("SIGTERM: %s step %d, exiting", "saved" if ckpt is not None else "stopped after", step)
            break
    if pending is not None:
        report(*pending)
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    sinks.close()
    return 0


def _shard_size(d) -> int | None:
    """distributed.dp_size (None: fill) divided into replicate groups: the FSDP shard size."""
    if d.dp_size is None:
        return None
    if d.dp_size % d.dp_replicate_size:
        raise UserError(f"distributed.dp_size: {d.dp_size} is not a multiple of dp_replicate_size {d.dp_replicate_size}")
    return d.dp_size // d.dp_replicate_size
