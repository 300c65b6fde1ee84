"""Whether the checkpoint in checkpoint_dir can be resumed by this config, checked before any data or
compile work: the same model shapes (the first differing field named) and a global batch the data
position can continue with."""

from __future__ import annotations


from flax import nnx

import jaxpretrain.model as M
from jaxpretrain.errors import UserError
from jaxpretrain.train.checkpoint import TrainCheckpointer
from jaxpretrain.train.restore_from import ResumeFrom


def check_resumable(cfg, hf_config, source: ResumeFrom | None) -> None:
    """The checkpoint to resume (train/restore_from.py) must hold the model this config builds: name
    the first field that differs (from the checkpoint's own record of its config) instead of failing
    inside Orbax."""
    if source is None:
        return
    directory, latest = source.directory, source.step
    hint = (f"resume needs the same model; for a new run use another checkpoint.checkpoint_dir (not {directory})" if source.own
            else "checkpoint.restore_from needs a checkpoint of the same model")
    ckpt = TrainCheckpointer(directory, read_only=True)
    try:
        meta = ckpt.restore_meta(latest)
        positions = list(ckpt.loader_positions(latest).values())
    finally:
        ckpt.close()
    _check_same_global_batch(meta, positions, cfg, f"{directory}/{latest}")
    theirs = M.config_from(meta["model_config"])
    ours_shapes = _param_shapes(hf_config, int(cfg.model.vocab_multiple))
    theirs_shapes = _param_shapes(theirs, int(meta["config"]["model"].get("vocab_multiple", 1)))
    if ours_shapes == theirs_shapes:
        return
    mine, saved = hf_config.to_dict(), theirs.to_dict()
    if M.family_of(hf_config) is not M.family_of(theirs):
        raise UserError(f"model: the checkpoint at {directory}/{latest} is a {saved.get('model_type')} model, this config a {mine.get('model_type')}; {hint}")
    ignore = {"architectures", "transformers_version", "_name_or_path"}
    for key in sorted(set(mine) | set(saved)):
        if key not in ignore and mine.get(key) != saved.get(key) and _affects_shapes(hf_config, key, saved.get(key), cfg):
            raise UserError(
                f"model.{key}: the checkpoint at {directory}/{latest} has {key}={saved.get(key)!r}, this config {mine.get(key)!r}; {hint}"
            )
    vm = meta["config"]["model"].get("vocab_multiple")
    raise UserError(f"model.vocab_multiple: the checkpoint at {directory}/{latest} has {vm}, this config {cfg.model.vocab_multiple}; {hint}")


def saved_global_batch(meta: dict) -> int | None:
    """The global batch a checkpoint was trained with (its meta's config), None if it does not say."""
    value = (meta.get("config", {}).get("step_scheduler") or {}).get("global_batch_size")
    return None if value is None else int(value)


def _check_same_global_batch(meta: dict, positions: list[dict], cfg, where: str) -> None:
    """The loader's position is a count of global batches (data/loader.py). Resumed with another
    global batch, the run continues at the sample it stopped before, as Megatron's sampler does from
    its consumed samples, where that sample starts a batch of the new size and the loader has no
    worker processes (whose interleaved position cannot be moved); otherwise one error says why."""
    theirs, ours = saved_global_batch(meta), int(cfg.step_scheduler.global_batch_size)
    if theirs is None or theirs == ours:
        return
    # Batches read so far: the loader's saved position (a run whose batch changed before has read
    # fewer or more batches than it took steps), else the step.
    index = positions[0].get("next_index") if positions else int(meta.get("step", 0))
    why = None
    if int(cfg.dataset.get("worker_count", 0) or 0) > 0 or not isinstance(index, int):
        why = "the position of loader worker processes cannot be moved to another batch size (dataset.worker_count 0 can)"
    elif index * theirs % ours:
        why = f"its {index * theirs} consumed samples ({index} batches x {theirs}) are not a whole number of batches of {ours}"
    elif index * theirs > int(meta.get("step", 0)) * ours:
        # The loader holds the run's batches: continuing at batch index * theirs / ours must leave
        # room for the steps still to run, so the batch may grow on resume (a ramp-up), not shrink.
        why = (f"its {index * theirs} consumed samples would be {index * theirs // ours} batches of {ours}, more than its "
               f"{meta.get('step')} steps: the global batch may grow on resume, not shrink")
    if why:
        raise UserError(
            f"step_scheduler.global_batch_size: the checkpoint at {where} was trained with {theirs}, this config {ours}; {why}. "
            f"Resume with {theirs} (local_batch_size and the device count may change), or use another checkpoint.checkpoint_dir"
        )


def _param_shapes(hf_config, vocab_multiple: int) -> dict:
    _, abstract = M.abstract_model(hf_config, vocab_multiple=vocab_multiple)
    return {path: tuple(v.shape) for path, v in nnx.to_flat_state(abstract)}


def _affects_shapes(hf_config, key, value, cfg) -> bool:
    """Whether setting `key` to the checkpoint's value changes the parameter shapes of this config."""
    trial = M.config_from(hf_config.to_dict())
    try:
        setattr(trial, key, value)
        return _param_shapes(trial, int(cfg.model.vocab_multiple)) != _param_shapes(hf_config, int(cfg.model.vocab_multiple))
    except Exception:  # a value this config class cannot take: it differs, and it matters
        return True
