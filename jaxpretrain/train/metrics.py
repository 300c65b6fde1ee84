"""What a run reports: the seed's step line, memory, MFU, and the metric sinks (JSONL, TensorBoard, W&B)."""

from __future__ import annotations

import json
import os
import resource
import secrets
import time

import jax

from jaxpretrain.atomic import save_atomic
from jaxpretrain.errors import UserError

# Dense bf16 peak of one device, by `device_kind` prefix, for MFU (None: unknown, MFU not shown).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10G": 70e12,
}


def peak_flops_per_device(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def flops_per_token(*, n_params_no_pos: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate: 6N for the matmuls plus 12 L H Q T for attention."""
    return 6.0 * n_params_no_pos + 12.0 * n_layer * n_head * head_dim * seq_len


def peak_memory_gib() -> float:
    """Peak device memory of this process's first device, or on CPU the process's peak resident memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def device_label() -> str:
    """The per-device unit of the step line: 'gpu' as in the seed's log, or 'cpu'/'tpu'."""
    return jax.devices()[0].platform


def format_step_line(step, epoch, loss, grad_norm, lr, mem_gib, tps, n_devices, num_label_tokens, mfu=None) -> str:
    line = (
        f"step {step} | epoch {epoch} | loss {loss:.4f} | grad_norm {grad_norm:.4f} | lr {lr:.2e} | "
        f"mem {mem_gib:.2f} GiB | tps {tps:.2f}({tps / n_devices:.2f}/{device_label()}) | "
        f"num_label_tokens {num_label_tokens}"
    )
    if mfu is not None:
        line += f" | mfu {100 * mfu:.1f}%"
    return line


def format_val_line(step, epoch, loss, lr, num_label_tokens) -> str:
    return f"[val] step {step} | epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | num_label_tokens {num_label_tokens}"


class MetricSinks:
    """Every metric of every step to `<run_dir>/{train,validation}.jsonl`, TensorBoard, and W&B if set
    (train metrics on the steps the cadence's log_remote picks).

    Only process 0 writes; the others get a no-op instance so the loop needs no branches.
    A run resumed at `resume_step` first drops what a killed predecessor logged after that step (and a
    last line it left half-written), so each step appears once, as the resumed run computes it;
    TensorBoard hides those events too (`purge_step`).
    """

    def __init__(self, run_dir: str | None, *, enabled: bool, wandb_cfg=None, config_dict=None,
                 resume_step: int | None = None):
        self.enabled = enabled and run_dir is not None
        self._tb = self._wandb = None
        self._files = {}
        if not self.enabled:
            return
        try:
            os.makedirs(run_dir, exist_ok=True)
            self._files = {}
            for name in ("train", "validation", "eval"):
                path = os.path.join(run_dir, f"{name}.jsonl")
                _keep_records_up_to(path, resume_step)
                self._files[name] = open(path, "a")
        except OSError as e:
            raise UserError(f"{e.filename or run_dir}: cannot write metrics ({e.strerror})") from None
        from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

        self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=(resume_step + 1) if resume_step else None)
        if wandb_cfg is not None and wandb_cfg.project:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb.project: set but the wandb package is not installed (pip install wandb)") from None
            named = dict(entity=wandb_cfg.entity, name=wandb_cfg.name, dir=wandb_cfg.save_dir, group=wandb_cfg.group,
                         tags=list(wandb_cfg.tags) or None, notes=wandb_cfg.notes, mode=wandb_cfg.mode)
            self._wandb = wandb.init(
                project=wandb_cfg.project, **{k: v for k, v in named.items() if v is not None}, config=config_dict,
                id=_wandb_run_id(run_dir, bool(resume_step)), resume="allow",  # a resumed run goes on in the same W&B run
            )

    def log(self, kind: str, step: int, metrics: dict, *, remote: bool = True) -> None:
        """One record to the JSONL file and TensorBoard; to W&B too unless `remote` is false."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        try:
            self._files[kind].write(json.dumps(record) + "\n")
            self._files[kind].flush()
        except OSError as e:
            raise UserError(f"{self._files[kind].name}: cannot write metrics ({e.strerror})") from None
        prefix = {"train": "train", "validation": "val"}.get(kind, kind)
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{name}", value, step)
        if self._wandb is not None and remote:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run_id(run_dir: str, resuming: bool) -> str:
    """The W&B run id of this run directory: made when a run starts afresh, read back on each resume."""
    path = os.path.join(run_dir, "wandb_run_id")
    if resuming:
        try:
            with open(path) as f:
                run_id = f.read().strip()
            if run_id:
                return run_id
        except FileNotFoundError:
            pass  # W&B was off before: a new W&B run
    run_id = secrets.token_hex(4)  # W&B's ids: short, [a-z0-9]
    save_atomic(path, lambda f: f.write(run_id.encode() + b"\n"))
    return run_id


def _keep_records_up_to(path: str, step: int | None) -> None:
    """Rewrite a metrics JSONL (atomically) without a torn last line and, unless `step` is None,
    without the records after `step`."""
    if not os.path.isfile(path):
        return  # nothing yet (or not a plain file: leave it alone)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the empty tail, or a line a killed run left half-written
        if isinstance(record, dict) and (step is None or record.get("step", 0) <= step):
            kept.append(line)
    if len(kept) == len(lines) - 1 and lines[-1] == b"":
        return  # nothing to drop (the common case: no rewrite)
    save_atomic(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))
