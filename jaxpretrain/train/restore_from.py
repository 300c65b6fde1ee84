"""Which checkpoint a run resumes from: its own checkpoint_dir's newest complete one, else the one
`checkpoint.restore_from` names (NeMo Automodel's key: another run's checkpoint to go on from).

  restore_from  none or LATEST: the newest complete checkpoint of checkpoint_dir (none: a fresh run).
                A step of checkpoint_dir (`300`), a checkpoint directory (`runs/a/checkpoints/300`),
                or a checkpoint_dir (`runs/a/checkpoints`: its newest complete checkpoint): the run
                starts from that checkpoint's state (weights, optimizer, data position, step) and
                saves into its own checkpoint_dir.

Unlike NeMo, a checkpoint_dir that already holds checkpoints of its own always wins: a preempted run
started from restore_from then resumes from its own progress, not from the start again. A step of
checkpoint_dir older than its newest is refused (a rerun would resume from the newer ones): move
those out to go back, or restore into another checkpoint_dir. Resolved before any data work.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from jaxpretrain.errors import UserError
from jaxpretrain.train.checkpoint import TrainCheckpointer

log = logging.getLogger("jaxpretrain")


@dataclasses.dataclass(frozen=True)
class ResumeFrom:
    directory: str  # an Orbax checkpoint root (a checkpoint_dir)
    step: int
    own: bool  # the run's own checkpoint_dir (else restore_from's)


def _steps(directory: str) -> tuple[list[int], list[int]]:
    """(complete steps, incomplete steps) of a checkpoint root."""
    ckpt = TrainCheckpointer(directory, read_only=True)
    try:
        return sorted(ckpt.all_steps()), ckpt.incomplete
    finally:
        ckpt.close()


def resume_from(checkpoint) -> ResumeFrom | None:
    """The checkpoint to resume (see above) for the `checkpoint` config section; None: a fresh run."""
    own_dir = os.path.abspath(checkpoint.checkpoint_dir)
    own = _steps(own_dir)[0] if os.path.isdir(own_dir) else []
    spec = checkpoint.get("restore_from")
    if spec is None or str(spec).strip().upper() in ("", "LATEST"):
        return ResumeFrom(own_dir, own[-1], True) if own else None
    directory, step = _resolve(str(spec).strip(), own_dir)
    if directory == own_dir:
        newer = [s for s in own if s > step]
        if newer:
            raise UserError(
                f"checkpoint.restore_from: {spec!r} is step {step} of checkpoint_dir {own_dir}, which holds newer "
                f"checkpoints ({', '.join(map(str, newer))}) that a rerun would resume from; move them out of it to go "
                f"back to step {step}, or set checkpoint.checkpoint_dir to a new directory (restore_from={own_dir}/{step})")
        return ResumeFrom(own_dir, step, True)
    if own:
        log.info("checkpoint.restore_from=%s not used: %s holds this run's own checkpoints (newest step %d), which it "
                 "resumes from", spec, own_dir, own[-1])
        return ResumeFrom(own_dir, own[-1], True)
    return ResumeFrom(directory, step, False)


def _resolve(spec: str, own_dir: str) -> tuple[str, int]:
    """restore_from as (checkpoint root, step): a step of checkpoint_dir, a step directory, or a root."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.sep not in spec and os.path.isdir(os.path.join(own_dir, spec)):  # NeMo: a name inside checkpoint_dir
        path = os.path.join(own_dir, spec)
    if not os.path.isdir(path):
        raise UserError(f"checkpoint.restore_from: {spec}: no such checkpoint directory")
    parent, name = os.path.split(path.rstrip(os.sep))
    if name.isdigit() and os.path.isdir(parent):  # a step directory of a checkpoint root
        complete, incomplete = _steps(parent)
        if int(name) in complete:
            return parent, int(name)
        if int(name) in incomplete:
            raise UserError(f"checkpoint.restore_from: {spec}: this checkpoint's save never finished (incomplete)")
    complete, incomplete = _steps(path)
    if not complete:
        what = f" (only incomplete ones: {', '.join(map(str, incomplete))})" if incomplete else ""
        raise UserError(f"checkpoint.restore_from: {spec}: holds no complete checkpoint{what}")
    return path, complete[-1]
