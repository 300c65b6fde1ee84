"""HellaSwag as llm.c and build-nanogpt score it: completion style, no prompt, no few-shot.

Per item, each of the (4) rows is `tokenizer(ctx)` followed by `tokenizer(" " + ending)`; the loss of
every ending token given everything before it is summed. `acc` picks the ending with the lowest sum,
`acc_norm` the lowest mean (sum / ending tokens), the number llm.c and build-nanogpt report.

Separate steps, so a training loop can call them on sharded parameters, every process running the
same calls on the same data:

    prepared = prepare(load_items("hellaswag_val.jsonl"), tokenizer, max_len=1024)   # once: numpy
    forward = make_forward(graphdef, mesh=mesh)                                       # once: jitted
    logits_fn = functools.partial(forward, (params, rest))     # each evaluation: the current state
    result = evaluate(logits_fn, prepared, 32, sharding=batch_sharding)   # = accuracy(score(...), labels)
    result.acc, result.acc_norm, result.line()

Rows are padded to a few bucket lengths (powers of two up to `max_len`) and every batch has the same
row count, so the loss is compiled once per bucket, not once per item.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from jaxpretrain.errors import UserError

MIN_BUCKET = 32  # shortest padded row length; HellaSwag rows are ~30-180 GPT-2 tokens
# Published anchors (acc_norm on the 10,042 validation items, this scoring).
ANCHORS = (("OpenAI GPT-2 124M", "0.2955"), ("llm.c GPT-2 124M (10B tokens)", "~0.294"))


@dataclass(frozen=True)
class Item:
    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Bucket:
    """Rows padded to one length. `rows[i]` = item * max_endings + ending of row i."""

    length: int
    tokens: np.ndarray  # int32 [n, length], zero-padded
    mask: np.ndarray  # float32 [n, length]: 1 where the token is an ending token (scored)
    rows: np.ndarray  # int64 [n]


@dataclass(frozen=True)
class Prepared:
    buckets: tuple[Bucket, ...]
    labels: np.ndarray  # int64 [items]
    num_endings: np.ndarray  # int64 [items]
    max_endings: int

    @property
    def num_items(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Scores:
    """Per item and ending: summed and mean loss of the ending tokens (+inf where an item has fewer endings)."""

    sum: np.ndarray  # float64 [items, max_endings]
    mean: np.ndarray  # float64 [items, max_endings]
    count: np.ndarray  # int64 [items, max_endings]: ending tokens scored


@dataclass(frozen=True)
class Result:
    acc: float
    acc_norm: float
    items: int
    # The mean over items of the correct ending's loss per token: a continuous companion to the
    # accuracies (which move in steps of 1/items), for curves and for telling two models apart.
    label_loss: float = float("nan")

    def line(self) -> str:
        return f"hellaswag acc {self.acc:.4f} acc_norm {self.acc_norm:.4f} ({self.items} items)"


def anchors_line() -> str:
    return "anchors (acc_norm): " + " | ".join(f"{name} {value}" for name, value in ANCHORS)


# -- items -----------------------------------------------------------------------------------------


def parse_item(row, where: str) -> Item:
    """One HellaSwag record: `ctx` (or `ctx_a` + " " + `ctx_b`), `endings`, `label` (int or digit string)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: not a JSON object")
    ctx = row.get("ctx")
    if ctx is None and isinstance(row.get("ctx_a"), str) and isinstance(row.get("ctx_b"), str):
        ctx = (row["ctx_a"] + " " + row["ctx_b"]).strip()  # the HF datasets form; `ctx` is this join
    if not isinstance(ctx, str):
        raise UserError(f"{where}: missing or non-string `ctx`")
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: `endings` must be a list of at least 2 strings")
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise UserError(f"{where}: `label` must be an ending index 0..{len(endings) - 1}, got {row.get('label')!r}")
    return Item(ctx, tuple(endings), label)


def load_items(path: str, limit: int | None = None) -> list[Item]:
    """The items of a HellaSwag jsonl file (the first `limit` if given). A malformed row (bad JSON or
    UTF-8, a missing field, a label out of range) is skipped and counted: one stderr note says how many
    and names the first, since the score is then over fewer items than the file's."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory (expected a HellaSwag .jsonl file)")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    items, skipped = [], []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not raw.strip():
                    continue
                try:
                    items.append(parse_item(json.loads(raw.decode("utf-8")), f"line {number}"))
                except ValueError:  # bad JSON or UTF-8 (UnicodeDecodeError is a ValueError)
                    skipped.append(f"line {number}: not valid JSON")
                except UserError as e:  # parse_item's reason, starting "line N: "
                    skipped.append(str(e))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if skipped:
        print(f"note: {path}: {len(skipped)} malformed row{'s' * (len(skipped) > 1)} skipped "
              f"(first: {skipped[0]}); {len(items)} items scored", file=sys.stderr, flush=True)
    if not items:
        raise UserError(f"{path}: holds no items" + (f" ({len(skipped)} malformed row{'s' * (len(skipped) > 1)} skipped)" if skipped else ""))
    return items


# -- prepare: tokens, masks, buckets -----------------------------------------------------------------


def bucket_lengths(max_len: int) -> list[int]:
    """Powers of two from MIN_BUCKET, ending with max_len itself."""
    lengths, n = [], MIN_BUCKET
    while n < max_len:
        lengths.append(n)
        n *= 2
    return lengths + [max_len]


def prepare(items: Sequence[Item], tokenizer, max_len: int) -> Prepared:
    """Tokenize every (context, ending) row and group the rows by padded length.

    The context is `tokenizer(ctx)` (with the tokenizer's special tokens, e.g. a BOS), each ending
    `tokenizer(" " + ending)` without them. A row longer than `max_len` loses tokens on the left
    (the context's start), as a sliding window would.
    """
    if max_len < 2:
        raise UserError(f"max_len: must be at least 2, got {max_len}")
    ctx_ids = tokenizer([it.ctx for it in items]).input_ids
    flat_endings = [" " + e for it in items for e in it.endings]
    end_ids = tokenizer(flat_endings, add_special_tokens=False).input_ids
    max_endings = max(len(it.endings) for it in items)
    lengths = bucket_lengths(max_len)
    per_bucket: dict[int, list] = {n: [] for n in lengths}
    k = 0
    for i, it in enumerate(items):
        for j in range(len(it.endings)):
            ctx, end = list(ctx_ids[i]), list(end_ids[k])
            k += 1
            if not end:
                raise UserError(f"item {i}: ending {j} is empty after tokenization")
            tokens, mask = (ctx + end)[-max_len:], ([0] * len(ctx) + [1] * len(end))[-max_len:]
            n = next(b for b in lengths if b >= len(tokens))
            per_bucket[n].append((i * max_endings + j, tokens, mask))
    buckets = []
    for n in lengths:
        rows = per_bucket[n]
        if not rows:
            continue
        tokens = np.zeros((len(rows), n), np.int32)
        mask = np.zeros((len(rows), n), np.float32)
        for r, (_, t, m) in enumerate(rows):
            tokens[r, : len(t)] = t
            mask[r, : len(m)] = m
        buckets.append(Bucket(n, tokens, mask, np.array([r[0] for r in rows], np.int64)))
    return Prepared(
        tuple(buckets), np.array([it.label for it in items], np.int64),
        np.array([len(it.endings) for it in items], np.int64), max_endings,
    )


# -- score: the model's losses on every row ------------------------------------------------------------


def _row_losses(logits, tokens, mask):
    """Summed loss of the masked tokens of each row, and their count: token t+1 given positions <= t."""
    import jax.numpy as jnp
    import optax

    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
    m = mask[:, 1:]
    return jnp.sum(nll * m, axis=-1), jnp.sum(m, axis=-1)


@functools.lru_cache(maxsize=8)
def _losses_fn(out_sharding):
    """`_row_losses` jitted once per output sharding, so repeated evaluations reuse the compiled program."""
    import jax

    return jax.jit(_row_losses) if out_sharding is None else jax.jit(_row_losses, out_shardings=out_sharding)


def score(
    logits_fn: Callable, prepared: Prepared, batch_size: int = 32, *, sharding=None,
) -> Scores:
    """Run `logits_fn(input_ids int32 [batch_size, L]) -> float32 logits [batch_size, L, V]` over every row.

    `logits_fn` should be jitted with the parameters as an argument (e.g. `functools.partial(jitted,
    params)`), not closing over them. `sharding` (a NamedSharding for `[batch, length]`, e.g. the train
    batch sharding) places each input batch on a mesh: every process passes the same full batch and
    gets the same replicated losses back, so all processes can call this together. The last batch of
    each bucket is padded with masked rows, so every call has the same shape per bucket.
    """
    import jax
    import jax.numpy as jnp

    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    if sharding is None:
        losses, place = _losses_fn(None), jnp.asarray
    else:
        try:
            sharding.shard_shape((batch_size, prepared.buckets[0].length))
        except ValueError:
            raise UserError(f"batch_size: {batch_size} does not split over the mesh's batch axes") from None
        # Replicated results: every process can read them.
        losses = _losses_fn(jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))

        def place(x):  # each process holds the whole batch and hands over its devices' slices
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    n_rows = prepared.num_items * prepared.max_endings
    sums = np.full(n_rows, np.inf)
    counts = np.zeros(n_rows, np.int64)
    for bucket in prepared.buckets:
        n = len(bucket.rows)
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            tokens = np.zeros((batch_size, bucket.length), np.int32)
            mask = np.zeros((batch_size, bucket.length), np.float32)
            tokens[: hi - lo], mask[: hi - lo] = bucket.tokens[lo:hi], bucket.mask[lo:hi]
            tokens_dev = place(tokens)
            s, c = losses(logits_fn(tokens_dev), tokens_dev, place(mask))
            sums[bucket.rows[lo:hi]] = np.asarray(s, np.float64)[: hi - lo]
            counts[bucket.rows[lo:hi]] = np.rint(np.asarray(c)[: hi - lo]).astype(np.int64)
    shape = (prepared.num_items, prepared.max_endings)
    sums, counts = sums.reshape(shape), counts.reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    return Scores(sums, means, counts)


def accuracy(scores: Scores, labels: np.ndarray) -> Result:
    """acc: lowest summed loss is the label; acc_norm: lowest mean loss is (ties: the first ending)."""
    labels = np.asarray(labels)
    acc = float(np.mean(np.argmin(scores.sum, axis=1) == labels))
    acc_norm = float(np.mean(np.argmin(scores.mean, axis=1) == labels))
    label_loss = float(np.mean(scores.mean[np.arange(len(labels)), labels]))
    return Result(acc, acc_norm, len(labels), label_loss)


def evaluate(logits_fn: Callable, prepared: Prepared, batch_size: int = 32, *, sharding=None) -> Result:
    """score + accuracy: what a training loop calls every `eval_every_steps`."""
    return accuracy(score(logits_fn, prepared, batch_size, sharding=sharding), prepared.labels)


def make_forward(graphdef, mesh=None) -> Callable:
    """`forward(states, input_ids) -> float32 logits`, jitted once, for an NNX model split as
    `(graphdef, *states)`: build it once, then each evaluation passes the current states, e.g.
    `functools.partial(forward, (params, rest))` as the `logits_fn` (a train step that donates its
    state invalidates arrays captured earlier). With `mesh`, the model's logical activation
    constraints apply, as in the train step."""
    import contextlib

    import jax
    from flax import nnx

    @jax.jit
    def forward(states, input_ids):
        scope = jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()
        with scope:
            return nnx.merge(graphdef, *states)(input_ids, deterministic=True)

    return forward


def model_logits_fn(model, mesh=None) -> Callable:
    """A `logits_fn` for a whole NNX model (`model(input_ids)`), its state an argument of the program."""
    import functools

    from flax import nnx

    graphdef, *states = nnx.split(model)
    return functools.partial(make_forward(graphdef, mesh), tuple(states))


if __name__ == "__main__":  # the CLI is jaxpretrain.eval's: the same as `python -m jaxpretrain.eval hellaswag`
    from jaxpretrain import errors, eval as eval_cli

    errors.run_cli(eval_cli.hellaswag_main)
