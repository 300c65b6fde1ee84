"""The pretraining recipe's run: join the processes, set up (train/setup.py), then the train/validation
loop with checkpoints, metrics and preemption.

This is the one place that wires the data path, the model, the mesh and the optimizer together
(DESIGN.md, "Layers"), in three parts: `setup` returns the state, `Trainer` runs the loop over it, and
`StopSignal` (train/preemption.py) says when to stop early.
"""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxpretrain.model as M
from jaxpretrain import parallel
from jaxpretrain.train import metrics as metrics_lib
from jaxpretrain.train import report
from jaxpretrain.train.preemption import StopSignal
from jaxpretrain.train.setup import Run, setup, validation_loader

log = logging.getLogger("jaxpretrain")


def run(cfg) -> int:
    # Joining the run comes first: setup_logging asks for jax.process_index(), which starts the XLA
    # backend, after which jax.distributed.initialize refuses to run.
    parallel.initialize_distributed()
    stop = StopSignal()  # SIGTERM from here on saves and exits (jax.distributed's handler is replaced)
    report.setup_logging()
    r = setup(cfg)
    report.log_experiment(r, float(M.param_l2_norm(r.state["params"])))
    return Trainer(r, stop).train()


class Trainer:
    """The train/validation loop over a set-up `Run`: steps, validation, checkpoints, metrics."""

    def __init__(self, r: Run, stop: StopSignal):
        self.r, self.stop = r, stop
        self.state = r.state
        cfg = r.cfg
        run_dir = cfg.logging.run_dir or os.path.join(cfg.checkpoint.checkpoint_dir, "logs")
        self.sinks = metrics_lib.MetricSinks(run_dir, enabled=jax.process_index() == 0, wandb_cfg=cfg.wandb, config_dict=cfg.to_dict())
        seq_len = int(cfg.dataset.seq_length)
        self.tokens_per_step = r.plan.global_batch_size * seq_len
        self.flops_per_token = r.training.flops_per_token(seq_len)
        self.peak_flops = metrics_lib.peak_flops_per_device(jax.devices()[0])
        self.last_time = time.perf_counter()

    def epoch(self, step: int) -> int:
        return (step - 1) // self.r.data.steps_per_epoch

    # -- validation

    def validate(self, step: int) -> float:
        t = self.r.training
        ce_sum, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        for local in validation_loader(self.r.data, self.r.plan):
            c, n = t.eval_step(self.state["params"], parallel.make_global_batch(local, self.r.mesh))
            ce_sum, count = ce_sum + c, count + n
        loss, count = float(ce_sum) / max(int(count), 1), int(count)
        log.info(metrics_lib.format_val_line(step, self.epoch(step), loss, t.lr_schedule.value(step), count))
        self.sinks.log("validation", step, {"val_loss": loss, "num_label_tokens": count})
        return loss

    # -- checkpoints

    def save(self, step: int) -> None:
        r = self.r
        if r.checkpointer is None:
            return
        cfg, t = r.cfg, r.training
        meta = {"step": step, "config": cfg.to_dict(), "model_config": t.hf_config.to_dict(), "tokenizer": cfg.dataset.tokenizer}
        r.checkpointer.save(step, params=self.state["params"], opt_state=self.state["opt_state"], data_iterator=r.data_iter, meta=meta)
        if cfg.checkpoint.save_consolidated:
            r.checkpointer.wait()
            out = os.path.join(r.checkpointer.directory, f"hf_step_{step}")
            M.save_pretrained(nnx.merge(t.graphdef, self.state["params"], t.rest), out, tokenizer=cfg.dataset.tokenizer)

    # -- metrics

    def report(self, step: int, device_metrics) -> None:
        """Step k's line and metrics; called after step k + 1 is dispatched, so the device never waits."""
        m = jax.device_get(device_metrics)
        now = time.perf_counter()
        dt, self.last_time = now - self.last_time, now
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"step {step}: loss {loss} / grad_norm {grad_norm} is not finite")
        tps = self.tokens_per_step / dt
        n_dev = jax.device_count()
        mfu = tps * self.flops_per_token / (self.peak_flops * n_dev) if self.peak_flops else None
        values = dict(
            loss=loss, grad_norm=grad_norm, lr=self.r.training.lr_schedule.value(step), mem=metrics_lib.peak_memory_gib(),
            tps=tps, num_label_tokens=int(m["num_label_tokens"]),
        )
        cfg = self.r.cfg
        if step % int(cfg.logging.log_every_steps) == 0 or step == self.r.data.total_steps or step == self.r.start_step + 1:
            log.info(metrics_lib.format_step_line(
                step, self.epoch(step), values["loss"], values["grad_norm"], values["lr"], values["mem"],
                tps, n_dev, values["num_label_tokens"], mfu,
            ))
        self.sinks.log("train", step, values | ({"mfu": mfu} if mfu is not None else {}))

    # -- the loop

    def train(self) -> int:
        r, ss = self.r, self.r.cfg.step_scheduler
        total = r.data.total_steps
        if r.start_step >= total:
            log.info("Nothing to do: the checkpoint is at step %d of %d", r.start_step, total)
        pending = None
        for step in range(r.start_step + 1, total + 1):
            batch = parallel.make_global_batch(next(r.data_iter), r.mesh)
            self.state, device_metrics = r.training.train_step(self.state, batch, jnp.int32(step - 1))
            if pending is not None:
                self.report(*pending)
            pending = (step, device_metrics)
            stopping = self.stop.should_stop(step)
            is_val = r.data.validation is not None and step % ss.val_every_steps == 0
            is_ckpt = step % ss.ckpt_every_steps == 0 or step == total or stopping
            if is_val or is_ckpt:
                self.report(*pending)
                pending = None
                if is_val or (is_ckpt and r.data.validation is not None and not stopping):
                    self.validate(step)
                if is_ckpt:
                    self.save(step)
                self.last_time = time.perf_counter()
            if stopping:
                log.info("SIGTERM: %s step %d, exiting", "saved" if r.checkpointer is not None else "stopped after", step)
                break
        if pending is not None:
            self.report(*pending)
        if r.checkpointer is not None:
            r.checkpointer.wait()
            r.checkpointer.close()
        self.sinks.close()
        return 0
