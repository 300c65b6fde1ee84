"""Validation loss (and perplexity) of a model on Megatron token files, as a training run measures it.

The samples are megatron-core's for the given prefixes, split, seed and sequence length (the
validation or test part of the split, built as the run builds it: data/builder.py), read in order;
the loss is the mean float32 token cross-entropy over every label token, the train step's own
`model_ce_sum` with dropout off. For a training checkpoint every data setting defaults to the run's
own validation (its `validation_dataset` section, inheriting `dataset`'s, and as many samples as it
validated on), so `eval loss --checkpoint-dir D --step N` gives the `[val] step N` loss it logged.
"""

from __future__ import annotations

import dataclasses
import json
import math

from jaxpretrain.errors import UserError

DEFAULT_SPLIT = "0.99, 0.01, 0.00"  # the seed's
DEFAULT_SEED = 1234  # Megatron's
SPLIT_INDEX = {"validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class EvalData:
    paths: object  # what dataset.paths takes: a glob, a prefix, a list, a weighted list, a dict
    split: str
    seed: int
    seq_length: int
    num_samples: int | None  # None: the whole split (Megatron's size None)
    index_mapping_dir: str | None


def data_of_run(config: dict) -> EvalData:
    """The validation data of a run, from the config its checkpoint recorded."""
    from jaxpretrain.config.sections import INHERITED_VALIDATION_FIELDS
    from jaxpretrain.data import ONE_EPOCH
    from jaxpretrain.train import cadence

    train, val, ss = config["dataset"], config["validation_dataset"], config["step_scheduler"]
    field = {k: (val.get(k) if val.get(k) is not None else train.get(k)) for k in INHERITED_VALIDATION_FIELDS}
    samples = cadence.val_samples_per_run(
        _Section(ss), val.get("num_val_samples"), int(ss["global_batch_size"]), train.get("num_train_samples"))
    if samples not in (0, ONE_EPOCH):  # the run validates on whole validation batches
        batch = int(val.get("global_batch_size") or ss["local_batch_size"])
        samples -= samples % batch
    return EvalData(field["paths"], str(field["split"]), int(field["seed"]), int(field["seq_length"]),
                    None if samples in (0, ONE_EPOCH) else int(samples), field["index_mapping_dir"])


class _Section(dict):
    """A plain dict read as a config section (attribute access), for cadence's functions."""

    __getattr__ = dict.get


def parse_paths(text: str):
    """--data as dataset.paths takes it: JSON for a list or dict, else one glob or prefix."""
    if text.strip()[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--data: {text!r} is not valid JSON ({e.msg} at character {e.pos})") from None
    return text


def build(data: EvalData, which: str, vocab_size: int):
    """The dataset of split `which` ("validation" or "test")."""
    from jaxpretrain.data import ONE_EPOCH, build_gpt_datasets

    sizes = [0, 0, 0]
    sizes[SPLIT_INDEX[which]] = ONE_EPOCH if data.num_samples is None else data.num_samples
    ds = build_gpt_datasets(data.paths, seq_length=data.seq_length, split=data.split, seed=data.seed, num_samples=tuple(sizes),
                            cache_dir=data.index_mapping_dir, vocab_size=vocab_size)[SPLIT_INDEX[which]]
    if ds is None or len(ds) == 0:
        raise UserError(f"--split: {data.split!r} leaves the {which} part empty")
    return ds


def evaluate(model, dataset, batch_size: int, *, chunk_size: int = 128) -> tuple[float, int]:
    """(mean token CE, label tokens) over every sample of `dataset`, in order, batch_size at a time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxpretrain.train.loss import IGNORE_INDEX
    from jaxpretrain.train.step import model_ce_sum

    graphdef, state = nnx.split(model)

    @jax.jit
    def ce_sum(state, batch):
        return model_ce_sum(nnx.merge(graphdef, state), batch, chunk_size=chunk_size, deterministic=True)

    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        ids = np.stack([r["input_ids"] for r in rows]).astype(np.int32)
        labels = np.stack([r["labels"] for r in rows]).astype(np.int32)
        if len(rows) < batch_size:  # one program for every batch: pad the last, its labels ignored
            pad = batch_size - len(rows)
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
            labels = np.concatenate([labels, np.full((pad, labels.shape[1]), IGNORE_INDEX, np.int32)])
        s, n = ce_sum(state, {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)})
        total, count = total + float(s), count + int(n)
    return total / max(count, 1), count


def line(loss: float, count: int, samples: int, seq_length: int, which: str) -> str:
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return f"{which} loss {loss:.4f} | ppl {ppl:.2f} | {samples} samples x {seq_length} tokens | num_label_tokens {count}"
