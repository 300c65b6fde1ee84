"""Everything a run needs before its first step, in the order it is built: batches, mesh, model config
(checked before any data work), data, model and optimizer (built sharded), and the resumed state.

`setup(cfg)` returns a `Run`; `jaxpretrain.train.loop` takes it from there. The benchmark reuses
`make_mesh`, `plan_batches` and `build_training` to time the same step on synthetic tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxpretrain.model as M
from jaxpretrain import parallel, processes
from jaxpretrain.config.sections import MODEL_OPTIONS  # ours; every other `model` field overrides the HF config
from jaxpretrain.data import ONE_EPOCH, build_gpt_datasets
from jaxpretrain.data.loader import Loader, make_loader
from jaxpretrain.errors import UserError
from jaxpretrain.tokenizer import special_token_ids
from jaxpretrain.train import cadence, memory, precheck
from jaxpretrain.train import schedule as schedule_lib
from jaxpretrain.train.checkpoint import TrainCheckpointer
from jaxpretrain.train.optim import build_optimizer
from jaxpretrain.train.restore_from import resume_from
from jaxpretrain.train.resume_check import check_resumable, saved_global_batch
from jaxpretrain.train.step import make_eval_step, make_train_step

log = logging.getLogger("jaxpretrain")

# ---------------------------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples divide over data-parallel ranks and micro-batches."""

    global_batch_size: int
    local_batch_size: int
    dp_size: int
    grad_accum: int
    max_steps: int | None  # None: num_epochs whole epochs (Data.total_steps is the run's length)
    train_samples: int  # or ONE_EPOCH: the train split built as one exhaustive epoch
    val_samples: int  # per evaluation, or ONE_EPOCH: the whole validation split (Data.val_samples)
    val_batch_size: int


def plan_batches(cfg, dp_size: int) -> BatchPlan:
    ss = cfg.step_scheduler
    g, l = int(ss.global_batch_size), int(ss.local_batch_size)
    for name, value in (("global_batch_size", g), ("local_batch_size", l)):
        if value <= 0:
            raise UserError(f"step_scheduler.{name}: must be positive, got {value}")
    if g % (l * dp_size):
        raise UserError(
            f"step_scheduler.global_batch_size: {g} is not a multiple of local_batch_size ({l}) x "
            f"data-parallel size ({dp_size})"
        )
    cadence.check(ss)
    # NeMo's MegatronPretraining: num_train_samples if set, else max_steps x the global batch, else
    # (no max_steps) Megatron's exhaustive one-epoch build. (NeMo also asserts num_train_samples >=
    # max_steps x the batch; fewer is allowed here: the run then ends when num_epochs passes end.)
    num_train = cfg.dataset.num_train_samples
    train_samples = num_train or (ONE_EPOCH if ss.max_steps is None else ss.max_steps * g)
    val_samples = cadence.val_samples_per_run(ss, cfg.validation_dataset.num_val_samples, g, num_train)
    val_batch = cfg.validation_dataset.global_batch_size or l * dp_size
    if val_batch % dp_size:
        raise UserError(f"validation_dataset.global_batch_size: {val_batch} is not a multiple of dp size {dp_size}")
    if 0 < val_samples < val_batch:  # (ONE_EPOCH's count is checked once the split is built)
        raise UserError(f"validation_dataset.num_val_samples: {val_samples} is fewer than one validation batch ({val_batch})")
    max_steps = None if ss.max_steps is None else int(ss.max_steps)
    return BatchPlan(g, l, dp_size, g // (l * dp_size), max_steps, int(train_samples), int(val_samples), int(val_batch))


# ------------------------------------------------------------------------------------------------- mesh


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


def _shard_size(d) -> int | None:
    """distributed.dp_size (None: fill) divided into replicate groups: the FSDP shard size."""
    if d.dp_size is None:
        return None
    if d.dp_size % d.dp_replicate_size:
        raise UserError(f"distributed.dp_size: {d.dp_size} is not a multiple of dp_replicate_size {d.dp_replicate_size}")
    return d.dp_size // d.dp_replicate_size


# ------------------------------------------------------------------------------------------------ model

def model_config(cfg, token_ids: dict | None = None):
    """The HF config of the model to train: `model.pretrained_model_name_or_path` plus the section's
    config overrides, validated by its family, and long enough for `dataset.seq_length`.

    `token_ids` (the run's tokenizer's, `tokenizer.special_token_ids`) fill the bos/eos fields the
    section leaves unset, so an exported model stops at its own tokenizer's eos; an id outside the
    vocabulary is left out (the config keeps its own).
    """
    m = cfg.model
    overrides = {k: v for k, v in m.items() if k not in MODEL_OPTIONS and v is not None}
    vocab_size = overrides.get("vocab_size")
    for field, value in (token_ids or {}).items():
        if field in m and m[field] is None and value is not None and (vocab_size is None or value < vocab_size):
            overrides[field] = value
    hf_config = M.config_from(m.pretrained_model_name_or_path, dropout=m.dropout, **overrides)
    limit = M.family_of(hf_config).max_positions(hf_config)
    for section in ("dataset", "validation_dataset"):
        seq = cfg[section].seq_length
        if seq is not None and limit < seq:
            raise UserError(f"{section}.seq_length: {seq} exceeds the model's maximum positions ({limit})")
    return hf_config


def model_options(cfg) -> dict:
    """The keyword arguments every family's model class takes, from the `model` section."""
    import jax.numpy as jnp

    return dict(
        dtype=jnp.dtype(cfg.model.dtype),
        attention_impl=cfg.model.attention_impl,
        vocab_multiple=int(cfg.model.vocab_multiple),
        remat=(cfg.model.get("remat_policy") or True) if cfg.model.remat else False,
        scan_layers=bool(cfg.model.get("scan_layers", False)),
    )


def build_model(cfg, hf_config, mesh):
    kw = model_options(cfg)
    if cfg.model.load_weights:
        return M.from_pretrained(cfg.model.pretrained_model_name_or_path, mesh=mesh, config=hf_config, **kw)
    return M.create_model(hf_config, mesh=mesh, seed=int(cfg.rng.seed), **kw)


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
    eval_step: object
    n_params: int
    wd_schedule: schedule_lib.WeightDecaySchedule | None = None

    def flops_per_token(self, seq_len: int) -> float:
        return M.flops_per_token(self.hf_config, seq_len)


def loss_chunk_size(cfg) -> int:
    """loss_fn.chunk_size, checked: sequence positions per chunk of the chunked loss (0: the plain loss)."""
    chunk = cfg.loss_fn.get("chunk_size", 0) or 0
    if not isinstance(chunk, int) or chunk < 0:
        raise UserError(f"loss_fn.chunk_size: must be a whole number >= 0 (0: the plain loss), got {chunk!r}")
    return chunk


def build_training(cfg, mesh, plan: BatchPlan, hf_config=None, total_steps: int | None = None) -> Training:
    """The sharded model, optimizer and compiled steps; `total_steps`: the run's length (Data.total_steps),
    which the schedule's unset lengths follow; None: step_scheduler.max_steps."""
    hf_config = hf_config or model_config(cfg)
    model = build_model(cfg, hf_config, mesh)
    n_params = M.param_count(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    lr_schedule, wd_schedule = schedule_lib.from_config(cfg, total_steps), schedule_lib.wd_from_config(cfg, total_steps)
    optimizer = build_optimizer(cfg, lr_schedule)  # its state and shardings; the step builds its own
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    # AdamW's moments take their parameter's sharding; scalars (the update count) are replicated.
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
    )
    state = {"params": params, "opt_state": jax.jit(optimizer.init, out_shardings=opt_shardings)(params)}
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings}
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = make_train_step(
        graphdef, rest, functools.partial(build_optimizer, cfg), lr_schedule, wd_schedule=wd_schedule, mesh=mesh, data_axes=parallel.DATA_AXES, grad_accum=plan.grad_accum,
        max_grad_norm=float(cfg.optimizer.max_grad_norm), dropout_seed=int(cfg.rng.seed),
        deterministic=not M.family_of(hf_config).dropout_active(hf_config), state_shardings=state_shardings,
        batch_sharding=batch_sharding, loss_chunk_size=loss_chunk_size(cfg),
    )
    eval_step = make_eval_step(
        graphdef, rest, mesh=mesh, param_shardings=param_shardings, batch_sharding=batch_sharding,
        loss_chunk_size=loss_chunk_size(cfg),
    )
    return Training(hf_config, graphdef, rest, state, state_shardings, lr_schedule, train_step, eval_step, n_params, wd_schedule)


def check_memory(cfg, training: Training, plan: BatchPlan, mesh) -> None:
    """Compile the train step ahead of time (the loop then reuses it) and fail with the estimate when
    it needs more memory per device than `distributed.device_memory_gib` or the device's limit."""
    import jax.numpy as jnp

    sharding = parallel.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((plan.global_batch_size, int(cfg.dataset.seq_length)), jnp.int32, sharding=sharding)
    compiled = training.train_step.lower(training.state, {"input_ids": tokens, "labels": tokens}, jnp.int32(0)).compile()
    limit = cfg.distributed.device_memory_gib
    need = memory.check_fits(
        compiled, jax.local_devices()[0], limit=None if limit is None else int(limit * memory.GIB),
        advice=(
            "lower step_scheduler.local_batch_size (more gradient accumulation, same global batch), "
            "set model.remat=True, or shard over more devices (distributed.dp_size)"
        ),
    )
    if need is not None:
        log.info("Train step memory per device: %s (XLA's estimate before step 1)", memory.size(need.total))


# ------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    train: object  # the train dataset (sample i = Megatron's sample i)
    validation: object | None
    loader: Loader  # this process's share of every train batch, in the sampler's order
    steps_per_epoch: int
    total_steps: int  # the run's length: cadence.total_steps (max_steps, or num_epochs x steps_per_epoch)
    val_samples: int = 0  # per evaluation (plan.val_samples, or the whole split's for ONE_EPOCH)


def build_data(cfg, plan: BatchPlan, vocab_size: int | None = None) -> Data:
    """The datasets and the train loader; with `vocab_size` (the model's), every token file is first
    checked to hold only ids below it (on a GPU a bad id would be clamped silently)."""
    from jaxpretrain.config.overrides import plain

    with processes.first_process_first("jaxpretrain/index_cache"):
        return _build_data(cfg, plan, plain, vocab_size)


def _build_data(cfg, plan: BatchPlan, plain, vocab_size: int | None) -> Data:
    ds_cfg, val_cfg = cfg.dataset, cfg.validation_dataset
    train_ds = build_gpt_datasets(
        plain(ds_cfg.paths), seq_length=ds_cfg.seq_length, split=ds_cfg.split, seed=ds_cfg.seed,
        num_samples=(plan.train_samples, 0, 0), cache_dir=ds_cfg.index_mapping_dir, vocab_size=vocab_size,
    )[0]
    val_ds, val_samples = None, 0
    if plan.val_samples:
        val_ds = build_gpt_datasets(
            plain(val_cfg.paths), seq_length=val_cfg.seq_length, split=val_cfg.split, seed=val_cfg.seed,
            num_samples=(0, plan.val_samples, 0), cache_dir=val_cfg.index_mapping_dir, vocab_size=vocab_size,
        )[1]
        val_samples = len(val_ds) if plan.val_samples == ONE_EPOCH else plan.val_samples
        if val_samples < plan.val_batch_size:
            field = "validation_dataset.num_val_samples" if plan.val_samples != ONE_EPOCH else "validation_dataset.split"
            raise UserError(f"{field}: {val_samples} validation samples are fewer than one validation batch ({plan.val_batch_size})")
    steps_per_epoch = len(train_ds) // plan.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"dataset.paths: {len(train_ds)} train samples do not fill one global batch of {plan.global_batch_size}")
    total_steps = cadence.total_steps(plan.max_steps, steps_per_epoch, int(cfg.step_scheduler.num_epochs))
    loader = make_loader(
        train_ds, global_batch_size=plan.global_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_batches=total_steps, worker_count=int(ds_cfg.worker_count), repeat=True,
    )
    return Data(train_ds, val_ds, loader, steps_per_epoch, total_steps, val_samples)


def validation_loader(data: Data, plan: BatchPlan) -> Loader:
    """A fresh pass over the validation samples (the same ones every time, as the seed evaluates)."""
    return make_loader(
        data.validation, global_batch_size=plan.val_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_batches=data.val_samples // plan.val_batch_size,
    )


# -------------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class Run:
    """A run ready for its first step: what `jaxpretrain.train.loop.train` takes."""

    cfg: object
    mesh: jax.sharding.Mesh
    plan: BatchPlan
    data: Data
    training: Training
    state: dict  # {"params", "opt_state"}: restored when resuming
    data_iter: object  # the train loader's iterator, at the resumed position
    checkpointer: TrainCheckpointer | None
    start_step: int  # the last completed step (0: a fresh run)
    config_source: str  # what --config named, for the log
    hellaswag_items: list | None = None  # eval.hellaswag_path's items, read (and checked) before any data work


def setup(cfg, source: str | None = None) -> Run:
    """Mesh, batches, model config, LR schedule and the checkpoint's model shape first (a bad config
    fails in a second, before any data or compile work), then data, the sharded model and optimizer,
    and the newest checkpoint if any."""
    precheck.check(cfg)  # what the train CLI checked before importing jax, for library callers
    mesh = make_mesh(cfg)
    plan = plan_batches(cfg, parallel.data_parallel_size(mesh))
    tokenizer = check_tokenizers(cfg)
    hf_config = model_config(cfg, special_token_ids(cfg.dataset.get("tokenizer"), tokenizer))
    loss_chunk_size(cfg)
    resume = resume_from(cfg.checkpoint) if cfg.checkpoint.enabled else None  # which checkpoint, if any
    check_resumable(cfg, hf_config, resume)
    hellaswag_items = None
    if cfg.eval.hellaswag_path:
        from jaxpretrain.evaluation import hellaswag

        hellaswag_items = hellaswag.load_items(cfg.eval.hellaswag_path, cfg.eval.hellaswag_limit)
    data = build_data(cfg, plan, vocab_size=int(hf_config.vocab_size))
    training = build_training(cfg, mesh, plan, hf_config, data.total_steps)
    check_memory(cfg, training, plan, mesh)  # before any checkpoint is touched
    state, data_iter = training.state, iter(data.loader)
    ckpt, start_step = None, 0
    if cfg.checkpoint.enabled:
        ckpt = TrainCheckpointer(
            cfg.checkpoint.checkpoint_dir, max_to_keep=int(cfg.checkpoint.max_to_keep), async_save=bool(cfg.checkpoint.async_save)
        )
        if resume is not None:
            # restore_from's checkpoint is read through its own (read-only) manager; saves go to ckpt's.
            src = ckpt if resume.own else TrainCheckpointer(resume.directory, read_only=True)
            latest = resume.step
            meta = src.restore_meta(latest)
            saved_batch, batch = saved_global_batch(meta), int(cfg.step_scheduler.global_batch_size)
            ratio = (saved_batch, batch) if saved_batch not in (None, batch) else None
            restored = src.restore(latest, params=state["params"], opt_state=state["opt_state"], data_iterator=data_iter,
                                   batch_ratio=ratio)
            state = {"params": restored["params"], "opt_state": restored["opt_state"]}
            start_step = latest
            log.info(src.resume_message(latest) if resume.own else
                     f"Restored from {src.step_dir(latest)} at step {latest} (checkpoint.restore_from); saving to {ckpt.directory}")
            if not resume.own:
                src.close()
            if ratio:
                log.info("Global batch %d -> %d since the checkpoint: the data continues at sample %d, as Megatron's sampler "
                         "continues from its consumed samples", saved_batch, batch, data_iter.get_state()["next_index"] * batch)
            changed = schedule_lib.changes_since(meta.get("config", {}), cfg, data.total_steps)
            if changed:
                log.info("Schedule changed since the checkpoint: %s; the config's values apply from step %d on",
                         ", ".join(changed), latest + 1)
        elif ckpt.incomplete:
            log.info("Starting at step 1: no complete checkpoint in %s (%s incomplete and ignored)",
                     ckpt.directory, ", ".join(map(str, ckpt.incomplete)))
    training.state = None  # the Run's state is the one to use (the initial one may have been donated)
    return Run(cfg, mesh, plan, data, training, state, data_iter, ckpt, start_step, source or "(a config object)", hellaswag_items)


def check_tokenizers(cfg):
    """The run's tokenizer goes into every checkpoint (export and save_consolidated write it out):
    one that cannot be loaded is an error now, not after the run. The embedded GPT-2 always loads
    (and is not loaded here). Returns dataset.tokenizer, loaded (None for the embedded GPT-2)."""
    from jaxpretrain.tokenizer import is_embedded_gpt2_name, load_tokenizer

    loaded = {}
    for section in ("dataset", "validation_dataset"):
        name = cfg[section].get("tokenizer")
        if name is not None and not is_embedded_gpt2_name(name) and name not in loaded:
            try:
                loaded[name] = load_tokenizer(name)
            except UserError as e:
                raise UserError(f"{section}.tokenizer: {e}") from None
    return loaded.get(cfg.dataset.get("tokenizer"))
