"""The builder: the blended dataset and `build_gpt_datasets`.

`build_gpt_datasets` is `BlendedMegatronDatasetBuilder(GPTDataset, ...).build()` as NeMo Automodel's
`MegatronPretraining` drives it:

- `paths` a glob: every match ending in `.bin`/`.idx` gives a prefix; the unique prefixes sorted as
  strings are the blend, unweighted. A prefix, a list of prefixes, a flat `["30", p1, "70", p2]` list,
  a `{"train": ..., "validation": ..., "test": ...}` dict (one distribution per split, no `split`),
  or a `.json` file holding one of these.
- One prefix: the split's GPTDataset itself (weights are dropped, as Automodel does).
- Several, weighted: each dataset builds `ceil(ceil(size * w) * 1.005)` samples, the blend
  `sum(ceil(size * w))`.
- Several, unweighted: each dataset is one epoch of its split, the weights are their lengths and the
  blend holds `min(size, sum of lengths)` samples.
- The blend's sample s comes from the dataset Megatron's greedy picks (`blending_indices`).
- A split's size ONE_EPOCH is Megatron's size None (NeMo's full-epoch training, no max_steps): one
  prefix gives one epoch of its split; an unweighted blend, one epoch of each dataset, every sample
  once (`exhaustive_blending_indices`); a weighted blend needs a size (Megatron asserts so).
"""

from __future__ import annotations

import concurrent.futures
import math
import os

import numpy as np

from jaxpretrain.data import gpt_dataset as gd
from jaxpretrain.data import index_cache
from jaxpretrain.data import vocab_check
from jaxpretrain.data.blend import blending_indices, exhaustive_blending_indices
from jaxpretrain.data.indexed import IndexedDataset
from jaxpretrain.data.paths import SPLIT_KEYS, SPLIT_LABELS, check_prefixes, parse_paths
from jaxpretrain.errors import UserError

# Megatron's `mid_level_dataset_surplus`: weighted blends build this much more of every dataset.
MID_LEVEL_DATASET_SURPLUS = 0.005
# A split's size meaning "one exhaustive epoch": Megatron's size None (which here means "not built").
ONE_EPOCH = -1


# == The blended dataset ============================================================================


class BlendedDataset:
    """Megatron's BlendedDataset: sample i is sample `dataset_sample_index[i]` of dataset
    `dataset_index[i]`; the indices are cached as `{md5}-BlendedDataset-{split}-*`.

    The constructor plans (identity, cache name); `build()` makes or loads the indices.
    """

    def __init__(self, datasets, weights, size: int | None, split: str, cache_dir: str | None):
        """`size` None: exhaustive, every sample of every dataset once; `weights` are then the
        datasets' lengths and stay integers (Megatron normalises them only for a given size)."""
        self.datasets = list(datasets)
        self.exhaustive = size is None
        self.weights = [int(w) for w in weights] if self.exhaustive else gd.normalize(weights)
        self.size = sum(self.weights) if self.exhaustive else int(size)
        self.split = split
        self.cache_dir = cache_dir
        self.seq_length = self.datasets[0].seq_length
        self.unique_identifiers = {
            "class": "BlendedDataset",
            "datasets": [d.unique_identifiers for d in self.datasets],
            "split": split,
            "weights": self.weights,
            "size": None if self.exhaustive else self.size,
        }
        self.unique_description = index_cache.describe(self.unique_identifiers)
        self.unique_description_hash = index_cache.description_hash(self.unique_description)
        self.cache_base = f"{self.unique_description_hash}-BlendedDataset-{split}"
        self.dataset_index = self.dataset_sample_index = None

    _NAMES = ("dataset_index", "dataset_sample_index")

    def _shapes(self) -> dict:
        return {name: (self.size,) for name in self._NAMES}

    def is_cached(self) -> bool:
        return index_cache.cache_complete(self.cache_dir, self.cache_base, self._NAMES, self.unique_description, self._shapes())

    def build(self, compute=None) -> "BlendedDataset":
        """`compute()` -> (dataset_index, dataset_sample_index) replaces the in-process computation
        (the builder passes a background process's result)."""

        def make():
            dataset_index, dataset_sample_index = (compute or self.compute_indices)()
            # Megatron's guard (checked when built; a cache hit was checked when it was written)
            self._check_sizes(dataset_index, dataset_sample_index)
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        arrays = index_cache.cached_arrays(
            self.cache_dir, self.cache_base, self._NAMES, self.unique_description, make, self._shapes()
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        return self

    def compute_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset_index, dataset_sample_index), Megatron's, computed (not cached)."""
        if self.exhaustive:
            return exhaustive_blending_indices(self.weights)
        return blending_indices(self.weights, self.size)

    def _check_sizes(self, dataset_index, dataset_sample_index) -> None:
        drawn = _draws_per_dataset(dataset_index, dataset_sample_index, len(self.datasets))
        for ds, n in zip(self.datasets, drawn):
            if n > len(ds):
                raise UserError(
                    f"{ds.dataset_path}: the {self.split} blend draws {n} samples from it but it holds {len(ds)} "
                    f"(Megatron's mid_level_dataset_surplus {MID_LEVEL_DATASET_SURPLUS} is too small for these weights)"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            idx += self.size
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]

    def get_batch(self, indices) -> dict:
        text = self.read_text(indices)
        return {"input_ids": text[:, :-1].copy(), "labels": text[:, 1:].copy()}

    def read_text(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        which = np.asarray(self.dataset_index[indices])
        sample = np.asarray(self.dataset_sample_index[indices])
        out = np.empty((len(indices), self.seq_length + 1), dtype=np.int32)
        for d in np.unique(which):
            rows = np.flatnonzero(which == d)
            out[rows] = self.datasets[int(d)].read_text(sample[rows])
        return out


def _draws_per_dataset(dataset_index, dataset_sample_index, n: int) -> np.ndarray:
    """How many samples the blend takes from each dataset: 1 + the sample index at its last draw,
    found from the end backwards (every dataset shows up near the end of a blend)."""
    draws = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    end, window = len(dataset_index), 4096
    while end > 0 and not seen.all():
        start = max(0, end - window)
        ids = np.asarray(dataset_index[start:end])[::-1]
        samples = np.asarray(dataset_sample_index[start:end])[::-1]
        found, last = np.unique(ids, return_index=True)
        new = ~seen[found]
        draws[found[new]] = samples[last[new]] + 1
        seen[found[new]] = True
        end, window = start, window * 2
    return draws


# == The builder ====================================================================================


def _size_per_dataset(weights, size: int, surplus: float = 0.0) -> list[int]:
    """`_get_size_per_split_per_dataset` for one split."""
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]


def build_gpt_datasets(
    paths,
    *,
    seq_length: int,
    split="969, 30, 1",
    seed: int = 1234,
    num_samples,
    cache_dir: str | None = None,
    splits_to_build=None,
    tokenizer=None,
    background_blend: bool | None = None,
    vocab_size: int | None = None,
):
    """(train, valid, test): each a dataset with `len()`, `ds[i]` and `ds.get_batch(indices)`, or None.

    Sample i of each equals sample i of megatron-core's `BlendedMegatronDatasetBuilder(GPTDataset, ...)`
    for the same paths, split, seed and sizes. `num_samples[i]` of 0 or None: split i is not built;
    ONE_EPOCH: built as megatron-core builds a size of None (one exhaustive epoch of the split);
    `splits_to_build` ("train" / "validation" / "test" or a list) restricts further. `cache_dir` is
    the index cache (Megatron's `path_to_cache`; None: build in memory). `tokenizer`: the identifiers
    Megatron records for the tokenizer (its `unique_identifiers`); only the cache names depend on it,
    the samples do not. `background_blend`: compute large blending indices in a thread while other
    threads build the datasets' indices (numpy's shuffles, sorts and file writes release the GIL, so
    two cores share the work; the result is the same); None: on. `vocab_size`: the model's
    vocabulary; when given, every token file must have an integer dtype that can hold it and ids in
    [0, vocab_size) (one pass per file, remembered in `cache_dir`), else a UserError names the file.
    """
    if background_blend is None:
        background_blend = True
    if not isinstance(seq_length, int) or seq_length < 1:
        raise UserError(f"dataset.seq_length: must be a positive integer, got {seq_length!r}")
    sizes = list(num_samples) if num_samples is not None else []
    if len(sizes) != 3:
        raise UserError(f"num_samples: expected (train, validation, test), got {num_samples!r}")
    for i, n in enumerate(sizes):
        if n is not None and (not isinstance(n, (int, np.integer)) or (n < 0 and n != ONE_EPOCH)):
            raise UserError(f"num_samples: {SPLIT_LABELS[i]} must be a non-negative integer, ONE_EPOCH or None, got {n!r}")
    asked = ["one epoch" if n == ONE_EPOCH else f"{n} samples" for n in sizes]
    wanted = [bool(n) for n in sizes]
    if splits_to_build is not None:
        names = [splits_to_build] if isinstance(splits_to_build, str) else list(splits_to_build)
        for name in names:
            if name not in SPLIT_KEYS:
                raise UserError(f"splits_to_build: unknown split {name!r} (use train, validation, test)")
        chosen = {SPLIT_KEYS[name] for name in names}
        wanted = [w and i in chosen for i, w in enumerate(wanted)]
    tok = _TokenizerIdentifiers(tokenizer) if tokenizer is not None else None

    kind, spec = parse_paths(paths)
    plans = []  # (split index, prefixes, weights, split fraction range, split string, matrix)
    if kind == "blend":
        prefixes, weights = spec
        text = gd.split_text(split)
        matrix = gd.split_matrix(gd.parse_split(split))
        for i in range(3):
            if not wanted[i]:
                continue
            if matrix[i] is None:
                raise UserError(
                    f"split: {text!r} leaves the {SPLIT_LABELS[i]} split empty but {asked[i]} was requested"
                )
            plans.append((i, prefixes, weights, matrix[i], text, matrix))
    else:
        for i in range(3):
            if not wanted[i]:
                continue
            if spec[i] is None:
                raise UserError(f"dataset.paths: no {SPLIT_LABELS[i]} entry but {asked[i]} was requested")
            prefixes, weights = spec[i]
            plans.append((i, prefixes, weights, (0.0, 1.0), None, None))
    for plan in plans:
        check_prefixes(plan[1])

    indexed: dict[str, IndexedDataset] = {}

    def open_indexed(prefix):
        if prefix not in indexed:
            indexed[prefix] = IndexedDataset(prefix)
        return indexed[prefix]

    if vocab_size is not None:
        _check_vocabulary(sorted({p for plan in plans for p in plan[1]}), open_indexed, vocab_size, cache_dir)

    # Plan every dataset first (cheap: identities and sizes), then build the index arrays in threads.
    # A blend needs only the datasets' lengths, so a large one starts at once beside them.
    jobs = []
    results = [None, None, None]
    with concurrent.futures.ThreadPoolExecutor(max_workers=_build_threads()) as pool:
        for i, prefixes, weights, (lo, hi), text, matrix in plans:
            config = gd.IndexConfig(
                seed=seed, seq_length=seq_length, split=text, matrix=matrix, tokenizer=tok, cache_dir=cache_dir
            )
            name = gd.SPLIT_NAMES[i]
            size = None if sizes[i] == ONE_EPOCH else sizes[i]  # Megatron's size
            if len(prefixes) == 1:
                ds = gd.GPTDataset.planned(open_indexed(prefixes[0]), prefixes[0], lo, hi, size, name, config)
                jobs.append(ds.build)
                results[i] = ds
                continue
            if weights is not None:
                if size is None:  # megatron-core asserts size_is_none => weights_are_none
                    raise UserError(
                        f"dataset.paths: the {SPLIT_LABELS[i]} split is a weighted blend, which needs a number of "
                        "samples: set step_scheduler.max_steps (or dataset.num_train_samples / validation_dataset.num_val_samples)"
                    )
                norm = gd.normalize(weights)
                target = _size_per_dataset(norm, size)
                buffer = _size_per_dataset(norm, size, MID_LEVEL_DATASET_SURPLUS)
                parts = [
                    gd.GPTDataset.planned(open_indexed(p), p, lo, hi, n, name, config) for p, n in zip(prefixes, buffer)
                ]
                blend_weights, blend_size = norm, sum(target)
            else:
                parts = [gd.GPTDataset.planned(open_indexed(p), p, lo, hi, None, name, config) for p in prefixes]
                blend_weights = [len(ds) for ds in parts]
                blend_size = None if size is None else min(size, sum(blend_weights))
            jobs += [ds.build for ds in parts]
            blended = BlendedDataset(parts, blend_weights, blend_size, name, cache_dir)
            background = None
            if background_blend and blended.size >= _BACKGROUND_BLEND_MIN and not blended.is_cached():
                background = pool.submit(blended.compute_indices)  # runs meanwhile
            results[i] = (blended, background)
        for done in [pool.submit(job) for job in jobs]:
            done.result()
        out = []
        for r in results:
            if isinstance(r, tuple):
                blended, background = r
                r = blended.build(background.result if background else None)
            out.append(r)
    return tuple(out)


def _check_vocabulary(prefixes, open_indexed, vocab_size: int, cache_dir: str | None) -> None:
    """Every file's dtype first (free), then the id ranges, in threads (numpy's reductions release
    the GIL); the first bad file in prefix order is the error."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise UserError(f"vocab_size: must be a positive integer, got {vocab_size!r}")
    files = [open_indexed(p) for p in prefixes]
    for ds in files:
        vocab_check.check_dtype(ds, int(vocab_size))
    with concurrent.futures.ThreadPoolExecutor(max_workers=_build_threads()) as pool:
        checks = [pool.submit(vocab_check.check_token_ids, ds, int(vocab_size), cache_dir) for ds in files]
        for check in checks:
            check.result()


# Blends at least this large are computed in their own thread while the datasets are built.
_BACKGROUND_BLEND_MIN = 1 << 20


def _build_threads() -> int:
    """Threads for building indices: the cores this process may use, at most 4 (plenty for 14 files)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(4, cores))


class _TokenizerIdentifiers:
    """Stands for Megatron's tokenizer in the description: serialised as its `unique_identifiers`."""

    def __init__(self, tokenizer):
        ids = getattr(tokenizer, "unique_identifiers", tokenizer)
        self.unique_identifiers = dict(ids) if isinstance(ids, dict) else ids
