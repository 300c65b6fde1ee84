"""`python -m jaxpretrain.eval hellaswag (--model HF_DIR | --checkpoint-dir DIR [--step N]) --data FILE`.

Scores a model on HellaSwag the way llm.c and build-nanogpt do (jaxpretrain/evaluation/hellaswag.py)
and ends with `hellaswag acc X acc_norm Y (N items)`, after the published anchors. The data file is
the standard `hellaswag_val.jsonl` (https://github.com/rowanz/hellaswag, data/), one item a line.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxpretrain.errors import UserError, run_cli


def load_model(model_dir: str | None, checkpoint_dir: str | None, step: int | None):
    """(model, tokenizer, description) from an HF directory or a training checkpoint."""
    import jax.numpy as jnp

    import jaxpretrain.model as M
    from jaxpretrain.tokenizer import load_tokenizer

    if model_dir is not None:
        return M.from_pretrained(model_dir, dtype=jnp.float32), load_tokenizer(model_dir), model_dir
    from jaxpretrain.export import load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint_dir, step)
    return model, load_tokenizer(meta.get("tokenizer") or "gpt2"), f"{checkpoint_dir} step {meta['step']}"


def hellaswag(args) -> int:
    from jaxpretrain.evaluation import hellaswag as hs

    if args.batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: must be at least 1, got {args.limit}")
    items = hs.load_items(args.data, args.limit)  # a bad file fails before any model work
    import jaxpretrain.model as M  # jax is imported only once the data file is known to be good

    model, tokenizer, what = load_model(args.model, args.checkpoint_dir, args.step)
    max_len = M.family_of(model.config).max_positions(model.config)
    start = time.perf_counter()
    prepared = hs.prepare(items, tokenizer, max_len)
    lengths = ", ".join(f"{b.length}x{len(b.rows)}" for b in prepared.buckets)
    print(f"hellaswag: {what}: {len(items)} items, rows by padded length {lengths}", file=sys.stderr, flush=True)
    result = hs.evaluate(hs.model_logits_fn(model), prepared, args.batch_size)
    print(f"scored in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(hs.anchors_line())
    print(result.line(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True)
    h = sub.add_parser("hellaswag", help="HellaSwag, completion style (acc, acc_norm)")
    source = h.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory (e.g. from jaxpretrain.export)")
    source.add_argument("--checkpoint-dir", help="checkpoint.checkpoint_dir of a training run")
    h.add_argument("--step", type=int, default=None, help="with --checkpoint-dir: the step (default: the newest)")
    h.add_argument("--data", required=True, help="HellaSwag jsonl (ctx, endings, label per line), e.g. hellaswag_val.jsonl")
    h.add_argument("--batch-size", type=int, default=32, help="rows (context + one ending) per forward pass")
    h.add_argument("--limit", type=int, default=None, help="score only the first N items")
    a = p.parse_args(argv)
    if a.step is not None and a.checkpoint_dir is None:  # an HF directory holds one set of weights, no steps
        raise UserError(f"--step: applies to --checkpoint-dir only, not to --model {a.model}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only notices are not news to the user
    return hellaswag(a)


def hellaswag_main(argv: list[str] | None = None) -> int:
    """`python -m jaxpretrain.evaluation.hellaswag ARGS` (where the scoring lives) is `... eval hellaswag ARGS`."""
    return main(["hellaswag", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    run_cli(main)
