"""What a run tells the person watching it: logging set-up and the experiment block before step 1."""

from __future__ import annotations

import datetime
import getpass
import importlib.metadata
import logging
import os
import socket
import sys

import jax


log = logging.getLogger("jaxpretrain")

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "transformers", "ml-collections")


def setup_logging() -> None:
    """INFO on process 0, warnings only elsewhere: one readable log per run."""
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def log_experiment(run, l2: float, run_dir: str, cadence) -> None:
    """The seed's experiment block, with a short config summary instead of the whole config (which
    goes to `<run_dir>/config.yaml`): who, where, what trains on what, library versions, the model;
    `cadence` is the trainer's (train/cadence.py: when it validates and checkpoints)."""
    cfg, mesh, plan, data = run.cfg, run.mesh, run.plan, run.data
    log.info("Experiment_details:")
    log.info("Timestamp: '%s'", datetime.datetime.now().isoformat(timespec="seconds"))
    log.info("User: %s", getpass.getuser())
    log.info("Host: %s", socket.gethostname())
    log.info("World size: %d processes, %d devices (%s)", jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)
    log.info("Mesh: %s", dict(mesh.shape))
    log.info("Config: %s (full config: %s)", run.config_source, os.path.join(run_dir, "config.yaml"))
    log.info("Model: %s", model_summary(run))
    log.info("Train data: %s", files_summary(data.train, cfg.dataset))
    if data.validation is not None:
        same = prefixes(data.validation) == prefixes(data.train)
        what = "the same files" if same else files_summary(data.validation, cfg.validation_dataset)
        log.info("Validation data: %s, split %r, %d samples in batches of %d", what, cfg.validation_dataset.split,
                 data.val_samples, plan.val_batch_size)
    ss = cfg.step_scheduler
    # Without max_steps the length comes from the data: say how (NeMo's "max_steps not provided").
    epochs = f" ({ss.num_epochs} epochs x {data.steps_per_epoch}: max_steps not set)" if ss.max_steps is None else ""
    log.info(
        "Steps: %d%s, %d tokens each (global batch %d x seq %d), %s",
        data.total_steps, epochs, plan.global_batch_size * cfg.dataset.seq_length, plan.global_batch_size,
        cfg.dataset.seq_length, cadence.describe(),
    )
    o = cfg.optimizer
    log.info("Optimizer: AdamW lr %g betas %s eps %g weight_decay %g, clip %g", o.lr, tuple(o.betas), o.eps, o.weight_decay, o.max_grad_norm)
    log.info("Checkpoints: %s", os.path.abspath(cfg.checkpoint.checkpoint_dir) if cfg.checkpoint.enabled else "off")
    log.info("Logs: %s (train.jsonl, validation.jsonl; TensorBoard: tensorboard --logdir %s)", run_dir, os.path.join(run_dir, "tensorboard"))
    log.info("Library versions:")
    for name in LIBRARIES:
        try:
            log.info("- %s: %s", name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            pass
    log.info("Batches: global %d = local %d x dp %d x grad_accum %d", plan.global_batch_size, plan.local_batch_size, plan.dp_size, plan.grad_accum)
    log.info("Datasets: train %s samples, validation %s samples", *(len(d) if d is not None else None for d in (data.train, data.validation)))
    log.info("Model summary:")
    log.info("Trainable parameters: {:,}".format(run.training.n_params))
    log.info("Total parameters: {:,}".format(run.training.n_params))
    log.info("Param L2 norm: %.4f", l2)
    wd = run.training.wd_schedule
    log.info("LR schedule: %s%s", run.training.lr_schedule.describe(), f"; {wd.describe()}" if wd else "")


def model_summary(run) -> str:
    import jaxpretrain.model as M
    from jaxpretrain.config.sections import MODEL_OPTIONS

    c = run.training.hf_config
    shape = {k: getattr(c, k) for k in run.cfg.model.keys() if k not in MODEL_OPTIONS and hasattr(c, k)}
    fields = " ".join(f"{k}={v}" for k, v in shape.items())
    m = run.cfg.model
    return (
        f"{M.family_of(c).name} from {m.pretrained_model_name_or_path!r} ({fields}), {run.training.n_params:,} parameters, "
        f"compute {m.dtype}, {'HF weights' if m.load_weights else 'fresh init'}"
    )


def prefixes(dataset) -> list[str]:
    """The token-file prefixes a built dataset reads (every member of a blend)."""
    members = getattr(dataset, "datasets", None) or [dataset]
    return [d.dataset_path for d in members]


def files_summary(dataset, section, show: int = 3) -> str:
    files = prefixes(dataset)
    listed = ", ".join(files[:show]) + (f", ... ({len(files) - show} more)" if len(files) > show else "")
    return f"{len(files)} file(s) from {section.paths!s}: {listed}"


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
