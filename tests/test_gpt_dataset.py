"""GPTDataset (one prefix) against megatron-core: lengths, index arrays, samples, cache files, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import megatron_reference as M
from jaxpretrain.data import build_gpt_datasets
from jaxpretrain.data import gpt_dataset as gd
from jaxpretrain.data import index_cache
from jaxpretrain.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_corpus")
    prefix = str(d / "corpus_0_text_document")
    M.write_corpus(prefix, 1500, seed=3, mean_length=30, empty_every=97)  # a few empty documents too
    return prefix


def _ours_tokens(ds, i):
    item = ds[i]
    return np.concatenate([item["input_ids"], item["labels"][-1:]]).astype(np.int64)


def assert_same(ref, ours, *, samples=200):
    """Same length, same index arrays, and the same tokens for a spread of samples + a batch read."""
    assert ours is not None and ref is not None
    assert len(ours) == len(ref)
    np.testing.assert_array_equal(np.asarray(ours.document_index), ref.document_index)
    np.testing.assert_array_equal(np.asarray(ours.sample_index), ref.sample_index)
    np.testing.assert_array_equal(np.asarray(ours.shuffle_index), ref.shuffle_index)
    assert np.asarray(ours.sample_index).dtype == ref.sample_index.dtype
    assert np.asarray(ours.shuffle_index).dtype == ref.shuffle_index.dtype
    picks = np.unique(np.linspace(0, len(ours) - 1, samples).astype(np.int64))
    batch = ours.get_batch(picks)
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (len(picks), ours.seq_length)
    eods = 0
    for row, i in enumerate(picks):
        expected = M.tokens_of(ref, int(i))
        np.testing.assert_array_equal(_ours_tokens(ours, int(i)), expected)
        np.testing.assert_array_equal(batch["input_ids"][row], expected[:-1])
        np.testing.assert_array_equal(batch["labels"][row], expected[1:])
        # Every label counts in Megatron's loss too (no pad id in the data, eod_mask_loss off), EOD included.
        assert bool(ref[int(i)]["loss_mask"].numpy().all())
        eods += int((expected == M.EOD).sum())
    assert eods > len(picks) // 2, "the reference samples should cross document ends"


def both(prefix, tmp_path, *, split, seq, seed, sizes, tag="x"):
    ref = M.build(([prefix], None), split=split, seq_length=seq, seed=seed,
                  sizes=[s or None for s in sizes], cache_dir=str(tmp_path / f"mega_{tag}"))
    ours = build_gpt_datasets(prefix, seq_length=seq, split=split, seed=seed, num_samples=sizes,
                              cache_dir=str(tmp_path / f"ours_{tag}"), tokenizer=M.FakeTokenizer())
    return ref, ours


def _epochs(ds):
    return ds.num_epochs, ds.num_samples


@pytest.mark.parametrize(
    "epochs_wanted, separate",
    [
        (1.2, True),    # 1 full epoch + a small part of the 2nd: the last epoch shuffled on its own
        (1.95, False),  # most of the 2nd epoch: one shuffle over both
        (3.5, True),    # four epochs, the last half used
        (0.5, None),    # within one epoch
    ],
)
def test_single_prefix_epochs(corpus, tmp_path, epochs_wanted, separate):
    seq = 16
    plan = build_gpt_datasets(corpus, seq_length=seq, split="969, 30, 1", num_samples=(1, 0, 0))[0]
    per_epoch = (plan.tokens_per_epoch - 1) // seq
    train_samples = int(epochs_wanted * per_epoch)
    ref, ours = both(corpus, tmp_path, split="969, 30, 1", seq=seq, seed=1234, sizes=(train_samples, 40, 0))
    train = ours[0]
    tokens = train.tokens_per_epoch
    if separate is None:
        assert train.num_epochs == 1
    else:
        assert train.num_epochs == int(np.ceil(epochs_wanted))
        from_final = train_samples - ((train.num_epochs - 1) * tokens - 1) // seq
        assert (from_final < int(0.8 * per_epoch)) is separate
    assert_same(ref[0], ours[0])
    assert_same(ref[1], ours[1])
    assert ours[2] is None


def test_three_way_split_fraction_style_and_cache_files(corpus, tmp_path):
    sizes = (800, 60, 30)
    ref, ours = both(corpus, tmp_path, split="0.90, 0.06, 0.04", seq=24, seed=1234, sizes=sizes)
    for r, o in zip(ref, ours):
        assert_same(r, o)
    mega, mine = M.list_cache(str(tmp_path / "mega_x")), M.list_cache(str(tmp_path / "ours_x"))
    assert sorted(mine) == sorted(mega)
    assert len(mine) == 12  # three splits x (description + three arrays)
    for name in mega:
        assert mine[name] == mega[name], name


@pytest.mark.parametrize("seed", [1234, 99])
def test_seeds(corpus, tmp_path, seed):
    ref, ours = both(corpus, tmp_path, split="900,50,50", seq=32, seed=seed, sizes=(400, 20, 10))
    for r, o in zip(ref, ours):
        assert_same(r, o, samples=80)


def test_cache_hit_reads_same_arrays_and_config_change_misses(corpus, tmp_path):
    kw = dict(seq_length=16, split="969, 30, 1", seed=5, num_samples=(300, 0, 0), cache_dir=str(tmp_path / "c"))
    first = build_gpt_datasets(corpus, **kw)[0]
    files = set(M.list_cache(str(tmp_path / "c")))
    again = build_gpt_datasets(corpus, **kw)[0]
    assert isinstance(again.shuffle_index, index_cache.MappedArray)
    assert set(M.list_cache(str(tmp_path / "c"))) == files
    np.testing.assert_array_equal(first.get_batch(np.arange(50))["input_ids"],
                                  again.get_batch(np.arange(50))["input_ids"])
    build_gpt_datasets(corpus, **{**kw, "seed": 6})
    assert len(set(M.list_cache(str(tmp_path / "c"))) - files) == 4  # a new description, a new hash


def test_pickles_cached_indices_as_file_names(corpus, tmp_path):
    import pickle

    ds = build_gpt_datasets(corpus, seq_length=16, split="969, 30, 1", seed=1, num_samples=(300, 0, 0),
                            cache_dir=str(tmp_path / "c"))[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # no index arrays inside
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.get_batch(np.arange(40))["input_ids"], ds.get_batch(np.arange(40))["input_ids"])
    assert pickle.loads(pickle.dumps(ds.shuffle_index[:5])).tolist() == ds.shuffle_index[:5].tolist()


def test_in_memory_without_cache_dir(corpus, tmp_path):
    ours = build_gpt_datasets(corpus, seq_length=16, split="969, 30, 1", seed=1234, num_samples=(300, 0, 0))[0]
    cached = build_gpt_datasets(corpus, seq_length=16, split="969, 30, 1", seed=1234, num_samples=(300, 0, 0),
                                cache_dir=str(tmp_path / "c"))[0]
    assert not isinstance(ours.shuffle_index, index_cache.MappedArray)
    np.testing.assert_array_equal(ours.shuffle_index, cached.shuffle_index)


_CONCURRENT = """
import logging, sys, time
sys.path.insert(0, {repo!r})
from jaxpretrain.data import gpt_dataset as gd
from jaxpretrain.data import index_cache
from jaxpretrain.data import build_gpt_datasets
built = []
original = gd.GPTDataset._build_indices
def counting(self):
    built.append(self.cache_base)
    time.sleep(1.0)  # hold the lock long enough for the other process to arrive
    return original(self)
gd.GPTDataset._build_indices = counting
while time.time() < {start}:
    time.sleep(0.01)
ds = build_gpt_datasets({prefix!r}, seq_length=16, split="969, 30, 1", seed=1234, num_samples=(2000, 0, 0),
                        cache_dir={cache!r})[0]
print(len(built), int(ds.get_batch([0, 1, 2])["input_ids"].sum()), type(ds.shuffle_index).__name__)
"""


def test_concurrent_processes_build_once(corpus, tmp_path):
    import time

    script = _CONCURRENT.format(repo=REPO, prefix=corpus, cache=str(tmp_path / "shared"), start=time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [out.split() for out, _ in outs]
    assert sorted(int(r[0]) for r in results) == [0, 1]  # exactly one process built
    assert results[0][1] == results[1][1]
    assert {r[2] for r in results} == {"MappedArray"}
    leftovers = [n for n in os.listdir(tmp_path / "shared") if n.startswith(".tmp-")]
    assert not leftovers


def test_sample_index_matches_cpp_with_empty_documents_and_no_drop_last():
    from megatron.core.datasets import helpers

    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 200))
        sizes = rng.integers(0, 40, n).astype(np.int32)
        sizes[0] = 0
        sizes[-1] = max(sizes[-1], 1)
        epochs, seq = int(rng.integers(1, 4)), int(rng.integers(2, 30))
        doc = np.tile(np.arange(n, dtype=np.int32), epochs)
        rng.shuffle(doc)
        tokens = int(sizes.sum())
        if epochs * tokens - 1 < seq:
            continue
        for drop in (True, False):
            if not drop and sizes[doc[-1]] == 0:
                continue  # Megatron itself asserts on a negative offset there
            ref = helpers.build_sample_idx(sizes, doc, seq, epochs, tokens, drop, True)
            ours = gd.build_sample_index(sizes, doc, seq, epochs, tokens, drop)
            assert ours.dtype == ref.dtype
            np.testing.assert_array_equal(ours, ref)


def test_split_parsing_matches_megatron():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for text in ["969, 30, 1", "0.99, 0.01, 0.00", "900,50,50", "1", "98,2", "0.333,0.333,0.334"]:
        vector = parse_and_normalize_split(text)
        assert gd.parse_split(text) == vector
        assert gd.split_matrix(vector) == convert_split_vector_to_split_matrix(vector)


# -- errors -----------------------------------------------------------------------------------------


def test_error_missing_prefix(tmp_path):
    with pytest.raises(UserError, match="no such dataset prefix"):
        build_gpt_datasets(str(tmp_path / "nothing"), seq_length=8, num_samples=(10, 0, 0))


def test_error_bin_without_idx(corpus, tmp_path):
    lone = tmp_path / "lone_text_document"
    with open(corpus + ".bin", "rb") as f, open(str(lone) + ".bin", "wb") as g:
        g.write(f.read())
    with pytest.raises(UserError, match=r"lone_text_document\.idx"):
        build_gpt_datasets(str(lone), seq_length=8, num_samples=(10, 0, 0))


def test_error_split_leaves_requested_split_empty(corpus):
    with pytest.raises(UserError, match="leaves the test split empty"):
        build_gpt_datasets(corpus, seq_length=8, split="99,1,0", num_samples=(10, 5, 5))
    small = corpus  # 1500 documents: 0.0001 of them round to none
    with pytest.raises(UserError, match="valid split"):
        build_gpt_datasets(small, seq_length=8, split="0.9999, 0.0001, 0", num_samples=(10, 5, 0))


def test_error_seq_length_larger_than_data(corpus):
    with pytest.raises(UserError, match="seq_length larger than the data can fill"):
        build_gpt_datasets(corpus, seq_length=10_000, split="98,2,0", num_samples=(10, 5, 0))
