"""The Grain loader: Megatron sampler order, per-process shares, workers, and resume through Orbax."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import megatron_reference as M
from jaxpretrain.data import build_gpt_datasets
from jaxpretrain.data.loader import loader_checkpoint_args, make_loader
from jaxpretrain.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G, SEQ = 8, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader_corpus")
    prefixes = []
    for i in range(2):
        prefix = str(d / f"part_{i}_text_document")
        M.write_corpus(prefix, 600, seed=20 + i, mean_length=30)
        prefixes.append(prefix)
    cache = str(d / "cache")
    kw = dict(seq_length=SEQ, split="95,5,0", seed=1234, num_samples=(400, 48, 0), cache_dir=cache)
    train, valid, _ = build_gpt_datasets(prefixes, **kw)
    return {"prefixes": prefixes, "kw": kw, "train": train, "valid": valid, "dir": str(d)}


def test_batches_follow_megatron_sampler_order(data):
    train = data["train"]
    batches = list(make_loader(train, global_batch_size=G, num_batches=10))
    assert len(batches) == 10
    for k, batch in enumerate(batches):
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (G, SEQ)
        expected = train.get_batch(np.arange(k * G, (k + 1) * G))
        np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(batch["labels"], expected["labels"])
        np.testing.assert_array_equal(batch["input_ids"][3], train[k * G + 3]["input_ids"])


@pytest.mark.parametrize("ranks, micro", [(1, 2), (2, 2), (4, 2)])
def test_each_step_takes_the_samples_nemo_megatron_sampler_gives_it(data, ranks, micro):
    """The seed's order from NeMo Automodel's own `MegatronPretrainingSampler`: step k of a run with
    `ranks` data-parallel ranks and micro-batch `micro` takes, over all ranks and their
    G / (ranks * micro) accumulation micro-batches, exactly the samples of our global batch k. With one
    rank the order within the step is the same too, and so is each rank's share when there is no
    accumulation. With accumulation NeMo deals a step's micro-batches out round-robin per rank, while
    each of our processes reads one contiguous block: the same samples in the same step, whose loss is
    a sum over the global batch (two processes equal one device: tests/test_multiprocess_train.py)."""
    train, steps, accum = data["train"], 10, G // (ranks * micro)
    sampler = M.nemo_sampler_class()
    nemo = [iter(sampler(total_samples=len(train), micro_batch_size=micro, data_parallel_rank=r,
                         data_parallel_size=ranks, drop_last=True, global_batch_size=G)) for r in range(ranks)]
    shares = [list(make_loader(train, global_batch_size=G, process_index=p, process_count=ranks, num_batches=steps))
              for p in range(ranks)]
    rows = lambda indices: np.stack([train[int(i)]["input_ids"] for i in indices])  # noqa: E731
    for k in range(steps):
        step = [[i for _ in range(accum) for i in next(rank)] for rank in nemo]  # rank -> its samples, in order
        ours = np.concatenate([shares[p][k]["input_ids"] for p in range(ranks)])
        np.testing.assert_array_equal(ours, rows(sorted(i for rank in step for i in rank)))
        if ranks == 1:
            np.testing.assert_array_equal(ours, rows(step[0]))
        if accum == 1:
            for p in range(ranks):
                np.testing.assert_array_equal(shares[p][k]["input_ids"], rows(step[p]))


def test_processes_get_disjoint_contiguous_shares(data):
    train = data["train"]
    shares = [list(make_loader(train, global_batch_size=G, process_index=p, process_count=2, num_batches=5))
              for p in range(2)]
    full = list(make_loader(train, global_batch_size=G, num_batches=5))
    for k in range(5):
        a, b = shares[0][k]["input_ids"], shares[1][k]["input_ids"]
        assert a.shape == (G // 2, SEQ)
        np.testing.assert_array_equal(np.concatenate([a, b]), full[k]["input_ids"])
        np.testing.assert_array_equal(a, train.get_batch(np.arange(k * G, k * G + G // 2))["input_ids"])


def test_repeat_goes_round_the_dataset_again(data):
    """num_epochs > 1: the batches of NeMo's MegatronPretrainingSampler iterated once per epoch, as
    the seed's StepScheduler iterates its dataloader (each pass starts again at sample 0)."""
    train = data["train"]
    available = len(train) // G
    batches = list(make_loader(train, global_batch_size=G, num_batches=available + 3, repeat=True))
    assert len(batches) == available + 3
    sampler = M.nemo_sampler_class()(total_samples=len(train), micro_batch_size=G, data_parallel_rank=0,
                                     data_parallel_size=1, drop_last=True, global_batch_size=G)
    epochs = list(sampler) + list(sampler)
    assert len(epochs) == 2 * available
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["input_ids"], np.stack([train[int(i)]["input_ids"] for i in epochs[k]]))


def test_validation_iterates_afresh(data):
    loader = make_loader(data["valid"], global_batch_size=G, num_batches=len(data["valid"]) // G)
    first = [b["input_ids"] for b in loader]
    second = [b["input_ids"] for b in loader]
    assert len(first) == len(second) == len(data["valid"]) // G
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)


def test_worker_processes_give_the_same_batches(data):
    train = data["train"]
    expected = list(make_loader(train, global_batch_size=G, num_batches=12))
    it = iter(make_loader(train, global_batch_size=G, num_batches=12, worker_count=2))
    try:
        got = list(it)
    finally:
        it.close()
    assert len(got) == len(expected) == 12
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_get_set_state(data):
    loader = make_loader(data["train"], global_batch_size=G, num_batches=20)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = it.get_state()
    rest = [b["input_ids"] for b in it]
    again = iter(loader)
    again.set_state(state)
    assert len(rest) == 13
    for x, y in zip([b["input_ids"] for b in again], rest, strict=True):
        np.testing.assert_array_equal(x, y)


_RESUME = """
import sys
sys.path.insert(0, {repo!r})
import numpy as np
import orbax.checkpoint as ocp
from jaxpretrain.data import build_gpt_datasets
from jaxpretrain.data.loader import loader_restore_args, make_loader
train = build_gpt_datasets({prefixes!r}, **{kw!r})[0]
it = iter(make_loader(train, global_batch_size={G}, num_batches=30))
manager = ocp.CheckpointManager({ckpt!r})
manager.restore(manager.latest_step(), args=ocp.args.Composite(data=loader_restore_args(it)))
np.save({out!r}, np.stack([next(it)["input_ids"] for _ in range(5)]))
"""


def test_resume_in_a_new_process_through_orbax(data, tmp_path):
    import orbax.checkpoint as ocp

    train = data["train"]
    uninterrupted = [b["input_ids"] for b in make_loader(train, global_batch_size=G, num_batches=30)]

    it = iter(make_loader(train, global_batch_size=G, num_batches=30))
    for _ in range(9):
        next(it)
    ckpt = str(tmp_path / "ckpt")
    manager = ocp.CheckpointManager(ckpt)
    manager.save(9, args=ocp.args.Composite(data=loader_checkpoint_args(it)))
    manager.wait_until_finished()
    manager.close()
    assert os.path.isfile(os.path.join(ckpt, "9", "data", "process_0-of-1.json"))

    out = str(tmp_path / "resumed.npy")
    script = _RESUME.format(repo=REPO, prefixes=data["prefixes"], kw=data["kw"], G=G, ckpt=ckpt, out=out)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = np.load(out)
    np.testing.assert_array_equal(resumed, np.stack(uninterrupted[9:14]))


def test_errors(data):
    with pytest.raises(UserError, match="does not divide"):
        make_loader(data["train"], global_batch_size=9, process_count=2)
    with pytest.raises(UserError, match="fewer than"):
        make_loader(data["train"], global_batch_size=G, num_batches=10_000)
    with pytest.raises(UserError, match="process_index"):
        make_loader(data["train"], global_batch_size=G, process_index=2, process_count=2)
