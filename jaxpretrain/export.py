"""`python -m jaxpretrain.export --checkpoint-dir DIR [--step N] --output HF_DIR`.

Turns a training checkpoint into a Hugging Face directory (config.json, model.safetensors and
the tokenizer files), the seed's `save_consolidated`. Only the `params` and `meta` items are read:
the optimizer state, which is twice the model, never leaves the disk. The output appears atomically.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from jaxpretrain.atomic import usual_mode
from jaxpretrain.hf_dir import check_replaceable
from jaxpretrain.errors import UserError, run_cli


def load_checkpoint_model(checkpoint_dir: str, step: int | None = None):
    """(model, meta) of a training checkpoint: the newest complete step unless `step`, restored onto
    this process's first device. Only the `params` and `meta` items are read."""
    import jax
    from flax import nnx

    import jaxpretrain.model as M
    from jaxpretrain.train.checkpoint import TrainCheckpointer

    _check_not_a_step_dir(checkpoint_dir)
    ckpt = TrainCheckpointer(checkpoint_dir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise UserError(f"{checkpoint_dir}: holds no complete checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise UserError(f"--step: {step} is not among the checkpoints in {checkpoint_dir} ({sorted(steps)})")
    meta = ckpt.restore_meta(step)
    hf_config = M.config_from(meta["model_config"])
    vocab_multiple = int(meta["config"]["model"]["vocab_multiple"])

    # The parameters' shapes without allocating them (every model variable is a parameter).
    graphdef, abstract_params = M.abstract_model(hf_config, vocab_multiple=vocab_multiple)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract_params)
    params = ckpt.restore_params(step, target)
    ckpt.close()
    return nnx.merge(graphdef, params), meta


def _check_not_a_step_dir(path: str) -> None:
    """A step directory (checkpoints/200) passed where the checkpoint root belongs: say which to pass."""
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip(os.sep))
    items = set(os.listdir(path)) if os.path.isdir(path) else set()
    if name.isdigit() and items & {"params", "meta", "_CHECKPOINT_METADATA"}:
        raise UserError(
            f"{path}: is one checkpoint (step {name}), not a checkpoint directory; "
            f"use --checkpoint-dir {os.path.dirname(path)} --step {int(name)}"
        )


def export_checkpoint(checkpoint_dir: str, output: str, step: int | None = None) -> str:
    out = os.path.abspath(output)
    root = os.path.abspath(checkpoint_dir)
    if os.path.commonpath([out, root]) == out:
        raise UserError(f"--output {output}: is the checkpoint directory or holds it; choose a directory outside it")
    check_replaceable(out)  # before jax and any checkpoint: the existing directory must be a model's

    import jaxpretrain.model as M
    from jaxpretrain.tokenizer import save_tokenizer

    model, meta = load_checkpoint_model(checkpoint_dir, step)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    except OSError as e:
        raise UserError(f"{output}: cannot write here ({e.strerror})") from None
    try:
        M.save_pretrained(model, tmp)
        save_tokenizer(meta.get("tokenizer") or "gpt2", tmp)
        usual_mode(tmp)
        check_replaceable(out)  # again: something may have appeared there meanwhile
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", required=True, help="checkpoint.checkpoint_dir of the training run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the newest)")
    p.add_argument("--output", required=True, help="Hugging Face directory to write")
    args = p.parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only notices are not news to the user
    out = export_checkpoint(args.checkpoint_dir, args.output, args.step)
    print(f"exported {args.checkpoint_dir} -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
