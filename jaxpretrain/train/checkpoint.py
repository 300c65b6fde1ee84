"""Training checkpoints with an Orbax CheckpointManager.

One checkpoint per step holds four items, each restorable alone:
  params      the model parameters (FSDP-sharded arrays; each process writes its own shards)
  opt_state   AdamW moments and the update count (which also drives the LR schedule)
  data        the Grain iterator position of every process
  meta        JSON: step, epoch, the config, and the model's HF config (what `export` needs)
Saves are asynchronous, written to a temporary directory and renamed when complete, so the newest
*complete* checkpoint is always the one resumed: a run killed mid-save resumes from the one before.

Another topology on restore (N processes wrote it, M restore it, on any mesh): arrays are read
straight into the shardings of the targets passed in (Orbax reads each process's slices). The loader
position is Grain's `process_{i}-of-{N}.json`, one per writing process, and it is the same in all of
them (the next global batch index; each process reads its own rows of that batch), so M processes
all take it, after checking that the N saved ones agree.
"""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import orbax.checkpoint as ocp

from jaxpretrain.data.loader import loader_checkpoint_args, loader_restore_args
from jaxpretrain.errors import UserError


class TrainCheckpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise UserError(f"{directory}: no such checkpoint directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._unreported: list[int] = []  # saved steps whose completion was not yet reported

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, *, params, opt_state, data_iterator, meta: dict) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=loader_checkpoint_args(data_iterator),
            meta=ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=True)
        self._unreported.append(step)

    def completed(self) -> list[int]:
        """Steps whose save has completed since the last call (committed: a restart would resume them)."""
        if not self._unreported or self._manager.is_saving_in_progress():
            return []
        done, self._unreported = self._unreported, []
        return done

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, step: int, *, params, opt_state, data_iterator) -> dict:
        """Restores into the shardings of `params`/`opt_state` (arrays or ShapeDtypeStructs) and
        moves `data_iterator` to the saved position; returns the restored items. The checkpoint may
        come from another number of processes or another mesh (see the module docstring)."""
        items = dict(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            meta=ocp.args.JsonRestore(),
        )
        saved = self.loader_positions(step)
        if not saved or any(n == jax.process_count() for _, n in saved):
            return self._manager.restore(step, args=ocp.args.Composite(**items, data=loader_restore_args(data_iterator)))
        positions = {json.dumps(state, sort_keys=True) for state in saved.values()}
        if len(positions) != 1:
            raise UserError(f"{self.step_dir(step)}/data: the {len(saved)} saved loader positions differ ({sorted(positions)})")
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        data_iterator.set_state(json.loads(positions.pop()))
        return restored

    def loader_positions(self, step: int) -> dict[tuple[int, int], dict]:
        """{(process index, process count): loader state} as the processes that wrote `step` saved them."""
        found = {}
        for path in glob.glob(os.path.join(self.step_dir(step), "data", "process_*-of-*.json")):
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", os.path.basename(path))
            if m:
                with open(path) as f:
                    found[(int(m.group(1)), int(m.group(2)))] = json.load(f)
        return found

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, abstract_params) -> object:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(abstract_params)))
        return self._manager.restore(step, args=args)["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _abstract(tree):
    """ShapeDtypeStructs with shardings, so Orbax restores each array straight into its shards."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.tree.map(leaf, tree)
