"""Training checkpoints with an Orbax CheckpointManager.

One checkpoint per step holds four items, each restorable alone:
  params      the model parameters (FSDP-sharded arrays; each process writes its own shards)
  opt_state   AdamW moments and the update count (which also drives the LR schedule)
  data        the Grain iterator position of every process
  meta        JSON: step, epoch, the config, and the model's HF config (what `export` needs)

What survives a crash, and why:
- Saves are asynchronous, written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` when
  complete, so a directory named by a step is always a whole checkpoint. A run killed mid-save leaves
  the temporary directory; the next start names it, removes it, and resumes from the newest complete
  step (`resume_message`).
- Old checkpoints (beyond `max_to_keep`) are first renamed into `<dir>/.deleted/` (one atomic rename),
  then removed in the background, so a kill mid-delete never leaves a half-deleted `<step>` either.
- A save that fails (disk full, a directory that turned read-only) is reported by `poll()` within a
  step or two, as a `CheckpointWriteError` naming the directory and the cause; the step that failed
  stays a temporary directory and the previous checkpoint is untouched.

Another topology on restore (N processes wrote it, M restore it, on any mesh): arrays are read
straight into the shardings of the targets passed in (Orbax reads each process's slices). The loader
position is Grain's `process_{i}-of-{N}.json`, one per writing process, and it is the same in all of
them (the next global batch index; each process reads its own rows of that batch), so M processes
all take it, after checking that the N saved ones agree.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import threading

import jax
import orbax.checkpoint as ocp

from jaxpretrain.data.loader import loader_checkpoint_args, loader_restore_args
from jaxpretrain.errors import UserError

_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
TRASH = ".deleted"  # old checkpoints wait here, already out of every step listing, to be removed

# Errors of the storage, not of the program: reported as one line, the checkpoints kept as they are.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_STORAGE_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied|Input/output error"
    r"|os_error_code='?(28|122|30|13|1|5)\b"
)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written; the previous one is intact."""


def incomplete_steps(directory: str) -> list[int]:
    """Steps whose save never finished (their temporary directory is still there)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_TMP_STEP.match, names) if m)


def storage_problem(error: BaseException) -> str | None:
    """The storage's complaint ('No space left on device', ...) somewhere in `error`'s chain, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return error.strerror or os.strerror(error.errno)
        match = _STORAGE_TEXT.search(str(error))
        if match:
            code = match.group(1)
            return os.strerror(int(code)) if code else match.group(0)
        error = error.__cause__ or error.__context__
    return None


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save with its traceback from several threads (and asyncio logs
    the same exception for the tasks nobody awaited any more); the failure is raised again on the main
    thread (`poll`/`wait`) and reported there as one line, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return not ("orbax" in record.pathname or "/orbax/" in record.getMessage())


_QUIET = _QuietOrbaxErrors()


def _ignore_late_write_callbacks() -> None:
    """When a save fails, Orbax closes the event loop of the failed write while tensorstore still has
    other writes of it in flight; their completion callbacks then find the loop closed and go to
    `sys.unraisablehook` as tracebacks, before the failure reaches the main thread. Those (and only
    those) are dropped: the failure itself is reported as one line."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxpretrain", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxpretrain = True
    sys.unraisablehook = hook


class TrainCheckpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise UserError(f"{directory}: no such checkpoint directory")
        # What a killed save left behind, noted before the manager removes it.
        self.incomplete = incomplete_steps(self.directory)
        self._primary = jax.process_index() == 0
        self._writes = not read_only and self._primary  # this process removes old checkpoints
        if self._writes:
            _empty_trash(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            todelete_subdir=None if read_only else TRASH,
            # Orbax 0.12 creates a save's directories in a background thread by default, and when
            # that fails (a directory that turned read-only) the save waits forever for their signal;
            # created here, on the calling thread, the failure is an error like any other.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_QUIET)
        _ignore_late_write_callbacks()
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise UserError(f"{self.directory}: cannot use as checkpoint directory ({e.strerror})") from None
        self._saving: int | None = None  # the step of a save that may still be running
        self._unreported: list[int] = []  # saved steps whose completion was not yet reported
        self._cleaner: threading.Thread | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def resume_message(self, step: int) -> str:
        """'Resumed from <dir>/12 at step 12 (newest complete checkpoint; 18 was incomplete and ignored)'."""
        why = "newest complete checkpoint"
        if self.incomplete:
            steps = ", ".join(map(str, self.incomplete))
            verb = "was" if len(self.incomplete) == 1 else "were"
            why += f"; {steps} {verb} incomplete and ignored"
        return f"Resumed from {os.path.join(self.directory, str(step))} at step {step} ({why})"

    def save(self, step: int, *, params, opt_state, data_iterator, meta: dict) -> None:
        """Start saving `step` (in the background when async); a failure of the previous save is raised here."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=loader_checkpoint_args(data_iterator),
            meta=ocp.args.JsonSave(meta),
        )
        if self._saving is not None:
            self.wait()  # Orbax would wait too; this way a failure is pinned on the right step
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            self._raise_storage(e, step)
            raise
        self._saving = step
        self._unreported.append(step)
        self._clean_trash_in_background()

    def poll(self) -> None:
        """Cheap, every step: raise a `CheckpointWriteError` as soon as a background save has failed."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def completed(self) -> list[int]:
        """Steps whose save has completed since the last call (committed: a restart would resume them);
        a save that failed raises its `CheckpointWriteError` here instead."""
        self.poll()
        # Each save waits for the one before it, so every step but the one still running is complete.
        done = [s for s in self._unreported if s != self._saving]
        self._unreported = [s for s in self._unreported if s == self._saving]
        return done

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, step: int, *, params, opt_state, data_iterator, batch_ratio: tuple[int, int] | None = None) -> dict:
        """Restores into the shardings of `params`/`opt_state` (arrays or ShapeDtypeStructs) and
        moves `data_iterator` to the saved position; returns the restored items. The checkpoint may
        come from another number of processes or another mesh (see the module docstring).
        `batch_ratio` (saved global batch, this run's): the position is moved to the same sample in
        batches of the new size (the caller has checked that it starts one)."""
        items = dict(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            meta=ocp.args.JsonRestore(),
        )
        saved = self.loader_positions(step)
        rebatch = batch_ratio is not None and batch_ratio[0] != batch_ratio[1]
        if not rebatch and (not saved or any(n == jax.process_count() for _, n in saved)):
            return self._restore(step, ocp.args.Composite(**items, data=loader_restore_args(data_iterator)))
        positions = {json.dumps(state, sort_keys=True) for state in saved.values()}
        if len(positions) != 1:
            raise UserError(f"{self.step_dir(step)}/data: the {len(saved)} saved loader positions differ ({sorted(positions)})")
        position = json.loads(positions.pop())
        if rebatch:
            if set(position) != {"next_index"}:
                raise UserError(f"{self.step_dir(step)}/data: a loader position of worker processes ({position}) cannot be moved "
                                "to another global batch; resume with the checkpoint's global_batch_size")
            old, new = batch_ratio
            position = {"next_index": position["next_index"] * old // new}
        restored = self._restore(step, ocp.args.Composite(**items))
        data_iterator.set_state(position)
        return restored

    def _restore(self, step: int, args) -> dict:
        """Orbax's restore, with a damaged checkpoint (a missing item, truncated or garbled files:
        Orbax raises KeyError, JSONDecodeError, ValueError, ...) as one line naming it and the way on."""
        try:
            return self._manager.restore(step, args=args)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise self.damaged(step, e) from None

    def damaged(self, step: int, e: BaseException) -> UserError:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        older = [s for s in self.all_steps() if s < step]
        way_on = (f"older checkpoints: {', '.join(map(str, older))} (export --step N; to train from one, move "
                  f"{self.step_dir(step)} out of {self.directory})") if older else "no older checkpoint to fall back on"
        return UserError(f"{self.step_dir(step)}: this checkpoint is damaged and cannot be restored ({reason}); {way_on}")

    def loader_positions(self, step: int) -> dict[tuple[int, int], dict]:
        """{(process index, process count): loader state} as the processes that wrote `step` saved them."""
        found = {}
        for path in glob.glob(os.path.join(self.step_dir(step), "data", "process_*-of-*.json")):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", os.path.basename(path))
            if m:
                try:
                    with open(path) as f:
                        found[(int(m.group(1)), int(m.group(2)))] = json.load(f)
                except (OSError, ValueError) as e:
                    raise self.damaged(step, e) from None
        return found

    def restore_meta(self, step: int) -> dict:
        return self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, abstract_params) -> object:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params)))
        return self._restore(step, args)["params"]

    def wait(self) -> None:
        """Block until the running save is complete; its failure is raised as a `CheckpointWriteError`."""
        step, self._saving = self._saving, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._unreported = [s for s in self._unreported if s != step]  # never reported as saved
            self._raise_storage(e, step)
            raise

    def close(self) -> None:
        self.wait()
        self._manager.close()
        if self._cleaner is not None:
            self._cleaner.join()
        if self._writes:
            # The last save's finalization moved the oldest kept step to the trash after the cleaner
            # ran: a finished run leaves no copy of it on disk (the next start would remove it too).
            _empty_trash(self.directory)

    def abandon(self) -> None:
        """On the way out after an error: let a running save finish (it may be the last good one),
        without raising again."""
        try:
            self.close()
        except Exception:
            pass

    # -- helpers -----------------------------------------------------------------------------------

    def _raise_storage(self, error: Exception, step: int | None) -> None:
        problem = storage_problem(error)
        if problem is None:
            return
        complete = [s for s in self._manager.all_steps() if step is None or s < step]
        kept = (
            f"the newest complete checkpoint, step {max(complete)}, is intact and a rerun resumes from it"
            if complete else "no earlier checkpoint exists; rerun"
        )
        what = f"step {step}" if step is not None else "a checkpoint"
        raise CheckpointWriteError(
            f"{self.directory}: cannot write checkpoint {what} ({problem}); {kept} once the directory is writable "
            f"and has space again"
        ) from None

    def _clean_trash_in_background(self) -> None:
        # What the previous save's finalization moved to the trash; removing it can take a while on
        # network file systems, so not on the training thread.
        if not self._primary or (self._cleaner is not None and self._cleaner.is_alive()):
            return
        self._cleaner = threading.Thread(target=_empty_trash, args=(self.directory,), name="checkpoint-trash", daemon=True)
        self._cleaner.start()


def _empty_trash(directory: str) -> None:
    trash = os.path.join(directory, TRASH)
    try:
        names = os.listdir(trash)
    except OSError:
        return
    for name in names:
        shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def _abstract(tree):
    """ShapeDtypeStructs with shardings, so Orbax restores each array straight into its shards."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.tree.map(leaf, tree)
