"""The pretraining recipe's run: join the processes, set up (train/setup.py), then the train/validation
loop with checkpoints, metrics and preemption.

This is the one place that wires the data path, the model, the mesh and the optimizer together
(DESIGN.md, "Layers"), in three parts: `setup` returns the state, `Trainer` runs the loop over it, and
`StopSignal` (train/preemption.py) says when to stop early.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxpretrain.model as M
from jaxpretrain import parallel, processes
from jaxpretrain.errors import UserError
from jaxpretrain.train import metrics as metrics_lib
from jaxpretrain.train import report
from jaxpretrain.train.cadence import Cadence
from jaxpretrain.train.numerics import NonFiniteError, NonFiniteGuard, all_finite
from jaxpretrain.train.prefetch import DevicePrefetcher
from jaxpretrain.train.preemption import EXIT_STOPPED, StopSignal, parse_signals
from jaxpretrain.train.setup import Run, setup, validation_loader

log = logging.getLogger("jaxpretrain")


def run(cfg, loaded=None) -> int:
    """Train as `cfg` says. `loaded` (jaxpretrain.config.files.Loaded): where the config came from,
    for the log and the effective config written to the run directory."""
    from jaxpretrain.config import finalize

    finalize(cfg)
    # Joining the run comes first: setup_logging asks for jax.process_index(), which starts the XLA
    # backend, after which jax.distributed.initialize refuses to run.
    parallel.initialize_distributed(heartbeat_timeout_s=cfg.distributed.heartbeat_timeout_s)
    # SIGTERM (or step_scheduler.preemption_signal) from here on saves and exits (jax.distributed's handler is replaced)
    stop = StopSignal(parse_signals(cfg.step_scheduler.preemption_signal))
    report.setup_logging()
    log.info(processes.startup_line())
    with processes.exit_at_once_on_error():
        r = setup(cfg, source=loaded.source if loaded is not None else None)
        trainer = Trainer(r, stop)
        trainer.write_config(loaded)
        report.log_experiment(r, float(M.param_l2_norm(r.state["params"])), trainer.run_dir, trainer.cadence)
        code = trainer.train()
        processes.leave_run()  # together, and immune to srun's SIGTERM to the stragglers (see there)
    return code


class Trainer:
    """The train/validation loop over a set-up `Run`: steps, validation, checkpoints, metrics."""

    def __init__(self, r: Run, stop: StopSignal):
        self.r, self.stop = r, stop
        self.state = r.state
        # Train batches reach the devices one step ahead; checkpoints save the position it keeps.
        self.batches = DevicePrefetcher(r.data_iter, r.mesh)
        cfg = r.cfg
        self.run_dir = os.path.abspath(cfg.logging.run_dir or os.path.join(cfg.checkpoint.checkpoint_dir, "logs"))
        self.sinks = metrics_lib.MetricSinks(
            self.run_dir, enabled=jax.process_index() == 0, wandb_cfg=cfg.wandb, config_dict=cfg.to_dict(),
            resume_step=r.start_step if r.checkpointer is not None else None,
        )
        self.guard = NonFiniteGuard(int(cfg.optimizer.skip_nonfinite_steps))
        self.last_saved = r.start_step if r.start_step else None  # the newest checkpoint written or resumed
        self.updates = r.start_step  # optimizer updates applied (steps minus skipped ones): what the LR follows
        seq_len = int(cfg.dataset.seq_length)
        self.tokens_per_step = r.plan.global_batch_size * seq_len
        self.flops_per_token = r.training.flops_per_token(seq_len)
        self.peak_flops = metrics_lib.peak_flops_per_device(jax.devices()[0])
        self.last_time = self.start_time = time.perf_counter()
        self.last_train: tuple[int, float] | None = None  # (step, loss) of the newest step reported
        self.last_val: tuple[int, float] | None = None
        self.hellaswag = self._prepare_hellaswag()
        self.cadence = Cadence.of_run(cfg.step_scheduler, r.data)  # which steps validate, checkpoint, log to W&B

    def write_config(self, loaded) -> None:
        """`<run_dir>/config.yaml`: every field of this run, which `--config` takes back (process 0)."""
        if jax.process_index() != 0:
            return
        from jaxpretrain.config import effective, files

        if loaded is None or not loaded.base:
            family = M.family_of(self.r.training.hf_config).name
            loaded = files.Loaded(self.r.cfg, {}, os.path.join(files.REPO_ROOT, "configs", f"{family}.py"), "")
        os.makedirs(self.run_dir, exist_ok=True)
        effective.write_effective(loaded, self.r.cfg, os.path.join(self.run_dir, "config.yaml"))

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
        log.info(metrics_lib.format_val_line(step, self.epoch(step), loss, t.lr_schedule.value(self.updates), count))
        self.sinks.log("validation", step, {"val_loss": loss, "num_label_tokens": count})
        self.last_val = (step, loss)
        return loss

    # -- HellaSwag

    def _prepare_hellaswag(self):
        """(prepared rows, jitted forward) for eval.hellaswag_path, or None: tokenized once, compiled once."""
        r = self.r
        if not r.hellaswag_items:
            return None
        from jaxpretrain.evaluation import hellaswag
        from jaxpretrain.tokenizer import load_tokenizer

        if r.cfg.eval.batch_size % r.plan.dp_size:
            raise UserError(f"eval.batch_size: {r.cfg.eval.batch_size} is not a multiple of the data-parallel size {r.plan.dp_size}")
        c = r.training.hf_config
        prepared = hellaswag.prepare(r.hellaswag_items, load_tokenizer(r.cfg.dataset.tokenizer), max_len=M.family_of(c).max_positions(c))
        return prepared, hellaswag.make_forward(r.training.graphdef, mesh=r.mesh)

    def evaluate_hellaswag(self, step: int) -> None:
        from jaxpretrain.evaluation import hellaswag

        prepared, forward = self.hellaswag
        # The states are passed afresh each time: the train step donates (invalidates) the old ones.
        logits_fn = functools.partial(forward, (self.state["params"], self.r.training.rest))
        result = hellaswag.evaluate(logits_fn, prepared, int(self.r.cfg.eval.batch_size), sharding=parallel.batch_sharding(self.r.mesh))
        log.info("[eval] step %d | hellaswag acc_norm %.4f | acc %.4f | items %d", step, result.acc_norm, result.acc, result.items)
        self.sinks.log("eval", step, {"hellaswag_acc_norm": result.acc_norm, "hellaswag_acc": result.acc,
                                        "hellaswag_label_loss": result.label_loss, "items": result.items})

    # -- checkpoints

    def save(self, step: int) -> None:
        r = self.r
        if r.checkpointer is None:
            return
        cfg, t = r.cfg, r.training
        if not all_finite(self.state):  # an update overflowed: finite loss and gradients, non-finite weights
            raise NonFiniteError(
                f"step {step}: the parameters or optimizer state are not finite after the update; stopped without "
                f"saving; {self.kept()}"
            )
        meta = {"step": step, "config": cfg.to_dict(), "model_config": t.hf_config.to_dict(), "tokenizer": cfg.dataset.tokenizer}
        r.checkpointer.save(
            step, params=self.state["params"], opt_state=self.state["opt_state"], data_iterator=self.batches.position(), meta=meta
        )
        self.last_saved = step
        if cfg.checkpoint.save_consolidated:
            r.checkpointer.wait()
            out = os.path.join(r.checkpointer.directory, f"hf_step_{step}")
            M.save_pretrained(nnx.merge(t.graphdef, self.state["params"], t.rest), out, tokenizer=cfg.dataset.tokenizer)

    def kept(self) -> str:
        """Which checkpoint a failed run leaves to resume from, for its error message."""
        if self.r.checkpointer is None:
            return "checkpoints are off (checkpoint.enabled=False)"
        if self.last_saved is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint, step {self.last_saved}, is kept and a rerun resumes from it"

    # -- metrics

    def report(self, step: int, device_metrics) -> None:
        """Step k's line and metrics; called after step k + 1 is dispatched, so the device never waits."""
        m = jax.device_get(device_metrics)
        now = time.perf_counter()
        dt, self.last_time = now - self.last_time, now
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        self.guard.check(step, loss, grad_norm, bool(m["finite"]), self.kept())  # raises when the run must stop
        self.updates = int(m["updates"])
        tps = self.tokens_per_step / dt
        n_dev = jax.device_count()
        mfu = tps * self.flops_per_token / (self.peak_flops * n_dev) if self.peak_flops else None
        values = dict(
            loss=loss, grad_norm=grad_norm, lr=self.r.training.lr_schedule.value(self.updates), mem=metrics_lib.peak_memory_gib(),
            tps=tps, num_label_tokens=int(m["num_label_tokens"]),
        )
        wd = self.r.training.wd_schedule
        if wd is not None and wd.incr_style != "constant":  # a scheduled weight decay goes to the metric files too
            values["weight_decay"] = wd.value(self.updates)
        cfg = self.r.cfg
        if step % int(cfg.logging.log_every_steps) == 0 or step == self.r.data.total_steps or step == self.r.start_step + 1:
            log.info(metrics_lib.format_step_line(
                step, self.epoch(step), values["loss"], values["grad_norm"], values["lr"], values["mem"],
                tps, n_dev, values["num_label_tokens"], mfu,
            ))
        self.sinks.log("train", step, values | ({"mfu": mfu} if mfu is not None else {}), remote=self.cadence.log_remote(step))
        self.last_train = (step, loss)

    def report_saved(self) -> None:
        """A line for each checkpoint whose (asynchronous) save has completed."""
        if self.r.checkpointer is not None:
            for step in self.r.checkpointer.completed():
                log.info("Checkpoint saved: step %d -> %s", step, self.r.checkpointer.step_dir(step))

    def summary(self, last_step: int, stopped: bool) -> None:
        r = self.r
        done = last_step - r.start_step
        tokens = done * self.tokens_per_step
        parts = [f"{'Stopped' if stopped else 'Finished'} at step {last_step} of {r.data.total_steps}",
                 f"{done} steps and {tokens:,} tokens in {report.duration(time.perf_counter() - self.start_time)}"]
        if self.last_train:
            parts.append(f"train loss {self.last_train[1]:.4f} (step {self.last_train[0]})")
        if self.last_val:
            parts.append(f"val loss {self.last_val[1]:.4f} (step {self.last_val[0]})")
        log.info("Summary: %s", " | ".join(parts))
        ckpt = r.checkpointer
        newest = ckpt.latest_step() if ckpt is not None else None
        if newest is not None:
            log.info("Newest checkpoint: %s", ckpt.step_dir(newest))
            if stopped:
                log.info("Next: rerun the same command to resume from step %d", newest)
            log.info("Export it: python -m jaxpretrain.export --checkpoint-dir %s --output %s",
                     ckpt.directory, os.path.join(os.path.dirname(ckpt.directory), "hf"))

    # -- the loop

    def train(self) -> int:
        try:
            return self._train()
        except BaseException:
            # Whatever stopped the run, a save still being written may be the last good checkpoint:
            # let it finish (a second failure of its own is not what the user needs to read first).
            if self.r.checkpointer is not None and jax.process_count() == 1:
                # (With several processes an error ends each at once, see processes.py: waiting here on
                # a save whose peers may be gone could hang; the previous complete checkpoint stays.)
                self.r.checkpointer.abandon()
            try:
                self.sinks.close()
            except Exception:
                pass  # e.g. the same full disk again: the first error is the one to report
            raise

    def _train(self) -> int:
        r, ss = self.r, self.r.cfg.step_scheduler
        total = r.data.total_steps
        if r.start_step >= total:
            log.info("Nothing to do: the checkpoint is at step %d of %d", r.start_step, total)
        pending, step, stopping = None, r.start_step, False
        eval_every = int(r.cfg.eval.eval_every_steps or ss.val_every_steps or total)
        for step in range(r.start_step + 1, total + 1):
            batch = next(self.batches)
            self.state, device_metrics = r.training.train_step(self.state, batch, jnp.int32(step - 1))
            if pending is not None:
                self.report(*pending)
            pending = (step, device_metrics)
            stopping = self.stop.should_stop(step)
            is_val, is_ckpt = self.cadence.validate(step, stopping), self.cadence.checkpoint(step, stopping)
            is_eval = self.hellaswag is not None and not stopping and (step % eval_every == 0 or step == total)
            if is_val or is_ckpt or is_eval:
                self.report(*pending)
                pending = None
                if is_val:
                    self.validate(step)
                if is_eval:
                    self.evaluate_hellaswag(step)
                if is_ckpt:
                    self.save(step)
                self.last_time = time.perf_counter()
            self.report_saved()  # also: a background save that failed (disk full, read-only) stops the run here
            if stopping:
                log.info("%s: %s step %d, exiting", self.stop.name, "saved" if r.checkpointer is not None else "stopped after", step)
                break
        if pending is not None:
            self.report(*pending)
        if r.checkpointer is not None:
            r.checkpointer.wait()
            self.report_saved()
        self.summary(step, stopping)
        if r.checkpointer is not None:
            r.checkpointer.close()
        self.sinks.close()
        return EXIT_STOPPED if stopping and step < total else 0  # stopped at the last step: finished
