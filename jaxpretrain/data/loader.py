"""The Grain input pipeline: each process's share of every global batch, prefetched, checkpointable.

Order: Megatron's `MegatronPretrainingSampler` (the seed's `dataloader_type: single`): global batch k
is samples `[k * G, (k + 1) * G)` of the dataset, and process p of P takes the contiguous slice
`[k * G + p * G / P, k * G + (p + 1) * G / P)`. One Grain element is one process-local batch, read by
`dataset.get_batch` in one vectorised call, so the pipeline has one element per step:

    MapDataset.range(num_batches) -> map(read batch k) -> to_iter_dataset (background threads)
                                  -> mp_prefetch (optional worker processes)

Position = the next batch index, so `iterator.get_state()` is a few bytes and a restored iterator
continues with exactly the batch an uninterrupted one would give.

Checkpointing inside the training checkpoint (an Orbax `CheckpointManager` composite item):

    it = iter(make_loader(train_ds, global_batch_size=G, ...))
    manager.save(step, args=ocp.args.Composite(..., data=loader_checkpoint_args(it)))
    manager.restore(step, args=ocp.args.Composite(..., data=loader_restore_args(it)))

Grain's handler writes one `process_{i}-of-{n}.json` per process (i = jax.process_index()).
"""

from __future__ import annotations

import grain
import numpy as np

from jaxpretrain.errors import UserError


class _ReadLocalBatch:
    """Batch k -> this process's rows of global batch k (picklable for worker processes)."""

    def __init__(self, dataset, global_batch_size: int, process_index: int, process_count: int):
        self.dataset = dataset
        self.local = global_batch_size // process_count
        self.offset = process_index * self.local
        self.global_batch_size = global_batch_size
        self.batches_per_epoch = len(dataset) // global_batch_size

    def __call__(self, k) -> dict:
        k = int(k) % self.batches_per_epoch  # past the end, epoch e + 1 repeats epoch e's order
        start = k * self.global_batch_size + self.offset
        return self.dataset.get_batch(np.arange(start, start + self.local, dtype=np.int64))


class Loader:
    """Iterable over this process's batches; each `iter()` starts a fresh Grain iterator at batch 0."""

    def __init__(self, pipeline: grain.IterDataset, num_batches: int, local_batch_size: int):
        self._pipeline = pipeline
        self.num_batches = num_batches
        self.local_batch_size = local_batch_size

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self._pipeline)

    def __len__(self) -> int:
        return self.num_batches


def make_loader(
    dataset,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    worker_count: int = 0,
    prefetch_buffer_size: int = 2,
    repeat: bool = False,
) -> Loader:
    """A loader yielding `{"input_ids", "labels"}` int32 numpy arrays `[G / P, seq_length]`.

    `num_batches` defaults to every full global batch of the dataset; with `repeat`, more batches than
    that go round the dataset again (the step scheduler's `num_epochs` > 1). `prefetch_buffer_size` batches
    are read ahead by background threads; `worker_count` > 0 reads in that many worker processes
    instead (each reopens the token files; the order does not change).
    """
    if global_batch_size < 1:
        raise UserError(f"global_batch_size: must be positive, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise UserError(
            f"global_batch_size: {global_batch_size} does not divide evenly over {process_count} processes"
        )
    available = len(dataset) // global_batch_size
    if num_batches is None:
        num_batches = available
    if available == 0 or (num_batches > available and not repeat):
        raise UserError(
            f"the dataset holds {len(dataset)} samples: {available} global batches of {global_batch_size}, "
            f"fewer than the {num_batches} requested"
        )
    read = _ReadLocalBatch(dataset, global_batch_size, process_index, process_count)
    pipeline = grain.MapDataset.range(num_batches).map(read)
    threads = 1 if prefetch_buffer_size > 0 else 0  # one reader thread: more only fight over the GIL
    pipeline = pipeline.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    if worker_count > 0:
        _use_flag_defaults()
        pipeline = pipeline.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(1, prefetch_buffer_size))
        )
    return Loader(pipeline, num_batches, read.local)


def _use_flag_defaults() -> None:
    # Grain 0.2.x reads an absl flag when it starts worker processes and fails if the program never
    # parsed flags (google/grain#1355); marking them parsed keeps every default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def loader_checkpoint_args(iterator):
    """The Orbax args that save a loader iterator's position (an item of a `Composite`)."""
    return grain.checkpoint.CheckpointSave(iterator)


def loader_restore_args(iterator):
    """The Orbax args that move `iterator` (a fresh `iter(loader)`) to the saved position."""
    return grain.checkpoint.CheckpointRestore(iterator)
