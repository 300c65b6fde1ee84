"""`python -m jaxpretrain.eval {hellaswag,loss} (--model HF_DIR | --checkpoint-dir DIR [--step N]) ...`.

hellaswag: scores a model on HellaSwag the way llm.c and build-nanogpt do
(jaxpretrain/evaluation/hellaswag.py) and ends with `hellaswag acc X acc_norm Y (N items)`, after the
published anchors. The data file is the standard `hellaswag_val.jsonl`
(https://github.com/rowanz/hellaswag, data/), one item a line.

loss: the validation (or test) loss and perplexity on Megatron token files, as a training run
measures it (jaxpretrain/evaluation/val_loss.py); a checkpoint's run supplies every data setting.
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


def loss(args) -> int:
    from jaxpretrain.evaluation import val_loss as vl

    if args.batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples: must be at least 1, got {args.num_samples}")
    if args.model is not None and args.data is None:
        raise UserError(f"--data: needed with --model {args.model} (the token files to score; a checkpoint knows its run's)")
    model, meta, what = _model_and_meta(args)
    run = vl.data_of_run(meta["config"]) if meta is not None else None  # a checkpoint's run: its validation data

    def setting(name: str, default):
        given = getattr(args, name)
        if given is not None:
            return given
        return getattr(run, name) if run is not None else default

    data = vl.EvalData(
        paths=vl.parse_paths(args.data) if args.data is not None else run.paths,
        split=setting("split", vl.DEFAULT_SPLIT),
        seed=setting("seed", vl.DEFAULT_SEED),
        seq_length=setting("seq_length", None) or _max_positions(model),
        # As many samples as the run validated on when these are its files, else the whole split.
        num_samples=args.num_samples if args.num_samples is not None or args.data is not None else run.num_samples,
        index_mapping_dir=setting("index_mapping_dir", None),
    )
    dataset = vl.build(data, args.split_name, int(model.config.vocab_size))
    start = time.perf_counter()
    value, count = vl.evaluate(model, dataset, args.batch_size)
    print(f"loss: {what}: {len(dataset)} {args.split_name} samples of {data.paths}, scored in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    print(vl.line(value, count, len(dataset), data.seq_length, args.split_name), flush=True)
    return 0


def _model_and_meta(args):
    """(model, the checkpoint's meta or None, description) of --model or --checkpoint-dir."""
    if args.model is not None:
        import jax.numpy as jnp

        import jaxpretrain.model as M

        return M.from_pretrained(args.model, dtype=jnp.float32), None, args.model
    from jaxpretrain.export import load_checkpoint_model

    model, meta = load_checkpoint_model(args.checkpoint_dir, args.step)
    return model, meta, f"{args.checkpoint_dir} step {meta['step']}"


def _max_positions(model) -> int:
    import jaxpretrain.model as M

    return int(M.family_of(model.config).max_positions(model.config))


def _source_flags(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory (e.g. from jaxpretrain.export)")
    source.add_argument("--checkpoint-dir", help="checkpoint.checkpoint_dir of a training run")
    parser.add_argument("--step", type=int, default=None, help="with --checkpoint-dir: the step (default: the newest)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True)
    h = sub.add_parser("hellaswag", help="HellaSwag, completion style (acc, acc_norm)")
    _source_flags(h)
    h.add_argument("--data", required=True, help="HellaSwag jsonl (ctx, endings, label per line), e.g. hellaswag_val.jsonl")
    h.add_argument("--batch-size", type=int, default=32, help="rows (context + one ending) per forward pass")
    h.add_argument("--limit", type=int, default=None, help="score only the first N items")
    v = sub.add_parser("loss", help="validation loss and perplexity on Megatron .bin/.idx files")
    _source_flags(v)
    v.add_argument("--data", default=None, help="token file prefixes as dataset.paths takes them (a glob, a prefix, or JSON: "
                   "a list, a weighted list); default with --checkpoint-dir: the run's validation files")
    v.add_argument("--split", default=None, help=f"Megatron document split (default: the run's, else {vl_default('DEFAULT_SPLIT')!r})")
    v.add_argument("--split-name", choices=("validation", "test"), default="validation", help="which part of the split")
    v.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the run's, else the model's positions)")
    v.add_argument("--seed", type=int, default=None, help=f"Megatron's dataset seed (default: the run's, else {vl_default('DEFAULT_SEED')})")
    v.add_argument("--num-samples", type=int, default=None,
                   help="samples to score (default: as many as the run validated on with its data, else the whole split)")
    v.add_argument("--index-mapping-dir", default=None, help="index cache directory (default: the run's, else built in memory)")
    v.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    a = p.parse_args(argv)
    if a.step is not None and a.checkpoint_dir is None:  # an HF directory holds one set of weights, no steps
        raise UserError(f"--step: applies to --checkpoint-dir only, not to --model {a.model}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only notices are not news to the user
    return hellaswag(a) if a.task == "hellaswag" else loss(a)


def vl_default(name: str):
    """A default of evaluation/val_loss.py for the help text (that module imports nothing heavy)."""
    from jaxpretrain.evaluation import val_loss

    return getattr(val_loss, name)


def hellaswag_main(argv: list[str] | None = None) -> int:
    """`python -m jaxpretrain.evaluation.hellaswag ARGS` (where the scoring lives) is `... eval hellaswag ARGS`."""
    return main(["hellaswag", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    run_cli(main)
