"""What a run tells the person watching it: logging set-up and the experiment block before step 1."""

from __future__ import annotations

import datetime
import getpass
import importlib.metadata
import logging
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


def log_experiment(run, l2: float) -> None:
    """The seed's experiment block: who, where, the config, library versions, the model summary."""
    cfg, mesh, plan, data = run.cfg, run.mesh, run.plan, run.data
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
    log.info("Datasets: train %s samples, validation %s samples", *(len(d) if d is not None else None for d in (data.train, data.validation)))
    log.info("Model summary:")
    log.info("Trainable parameters: {:,}".format(run.training.n_params))
    log.info("Total parameters: {:,}".format(run.training.n_params))
    log.info("Param L2 norm: %.4f", l2)
    s = run.training.lr_schedule
    log.info(
        "LR schedule: init_lr %.6g max_lr %.6g min_lr %.6g warmup %d decay %d style %s",
        s.init_lr, s.max_lr, s.min_lr, s.warmup_steps, s.decay_steps, s.decay_style,
    )
