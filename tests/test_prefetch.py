"""DevicePrefetcher: batches on the devices one step ahead, and a checkpointed position that resumes at
the first batch not yet trained (Grain's own checkpoint handler, as the train checkpoint uses it)."""

import numpy as np

from jaxpretrain import parallel
from jaxpretrain.data.loader import loader_checkpoint_args, loader_restore_args, make_loader
from jaxpretrain.train.prefetch import DevicePrefetcher


class CountingDataset:
    """Sample i is [i, i, ...]: a batch shows which samples it holds."""

    def __len__(self):
        return 64

    def get_batch(self, indices):
        ids = np.repeat(np.asarray(indices, np.int32)[:, None], 4, axis=1)
        return {"input_ids": ids, "labels": ids + 1}


def _first_ids(batch) -> list[int]:
    return np.asarray(batch["input_ids"])[:, 0].tolist()


def test_prefetched_batches_and_resume_position(tmp_path):
    from grain.checkpoint import CheckpointHandler

    mesh = parallel.make_mesh()
    loader = make_loader(CountingDataset(), global_batch_size=4, num_batches=10)
    batches = DevicePrefetcher(iter(loader), mesh)
    seen = [_first_ids(next(batches)) for _ in range(3)]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # the loader's order, unchanged
    assert next(iter(batches)) is not None and len(batches._queue) == 1  # one batch already on its way

    # Four batches trained, the fifth already read: the checkpoint must point at the fifth.
    handler = CheckpointHandler()
    (tmp_path / "prefetched").mkdir()
    (tmp_path / "plain").mkdir()
    handler.save(tmp_path / "prefetched", args=loader_checkpoint_args(batches.position()))
    # What the plain iterator writes after exactly four batches is the same file.
    plain = iter(loader)
    for _ in range(4):
        next(plain)
    handler.save(tmp_path / "plain", args=loader_checkpoint_args(plain))
    name = "process_0-of-1.json"
    assert (tmp_path / "prefetched" / name).read_text() == (tmp_path / "plain" / name).read_text()

    resumed = iter(loader)
    handler.restore(tmp_path / "prefetched", args=loader_restore_args(resumed))
    assert _first_ids(next(DevicePrefetcher(resumed, mesh))) == [16, 17, 18, 19]


def test_prefetcher_ends_with_the_loader():
    batches = DevicePrefetcher(iter(make_loader(CountingDataset(), global_batch_size=8, num_batches=3)), parallel.make_mesh())
    assert [_first_ids(b)[0] for b in batches] == [0, 8, 16]
