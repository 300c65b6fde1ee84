"""Blends against megatron-core: blending indices vs its C++, weighted / glob / per-split blends, paths."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import megatron_reference as M
from jaxpretrain.data import ONE_EPOCH, blending_indices, build_gpt_datasets
from jaxpretrain.data.blend import exhaustive_blending_indices
from jaxpretrain.errors import UserError

SIZES_DOCS = [400, 700, 250, 300, 500, 450, 380, 420, 600, 333, 444, 150]


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend_corpus")
    out = []
    for i, n in enumerate(SIZES_DOCS):
        prefix = str(d / f"shard_{i}_text_document")
        M.write_corpus(prefix, n, seed=100 + i, mean_length=25)
        out.append(prefix)
    return out


def _megatron_blending(weights, size):
    from megatron.core.datasets import helpers_cpp

    ds = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(ds, sample, list(weights), len(weights), size, False)
    return ds, sample


def _weight_cases():
    rng = np.random.default_rng(0)
    cases = [[1.0], [0.5, 0.5], [1 / 3] * 3, [0.3, 0.7], [0.5, 0.3, 0.2], [0.9, 0.1], [0.25] * 4]
    lengths = rng.integers(700_000, 760_000, 13).tolist() + [182_000]  # the seed's 14 FineWeb shards
    cases.append(lengths)
    cases.append([730_000] * 13 + [182_000])  # exact ties between equal shards
    for k in range(24):
        n = int(rng.integers(2, 20))
        kind = k % 4
        if kind == 0:
            w = rng.random(n)
        elif kind == 1:
            w = rng.integers(1, 10, n).astype(float)
        elif kind == 2:
            w = rng.dirichlet(np.ones(n) * 0.5) + 1e-4  # very unequal
        else:
            w = rng.integers(1000, 1010, n).astype(float)
        cases.append(w)
    return [np.asarray(c, dtype=np.float64) / np.sum(c) for c in cases]


@pytest.mark.parametrize("case", range(len(_weight_cases())))
def test_blending_indices_bit_identical_to_cpp(case):
    weights = _weight_cases()[case].tolist()
    size = 40_000 if len(weights) == 14 else 1 + (case * 7919) % 20_000
    ours = blending_indices(weights, size)
    ref = _megatron_blending(weights, size)
    assert ours[0].dtype == np.int16 and ours[1].dtype == np.int64
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_blending_indices_large_fineweb_like():
    rng = np.random.default_rng(1)
    lengths = rng.integers(700_000, 760_000, 13).tolist() + [182_000]
    weights = (np.asarray(lengths, float) / np.sum(lengths)).tolist()
    ours = blending_indices(weights, 600_000)
    ref = _megatron_blending(weights, 600_000)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def _exhaustive_cases():
    rng = np.random.default_rng(5)
    cases = [[1, 1], [1, 999], [3, 3, 3], [7, 1, 13, 2, 100], [400_000, 300_000, 299_999, 1]]  # the last: 1e6 samples
    cases += [rng.integers(1, 400, int(rng.integers(2, 11))).tolist() for _ in range(12)]
    cases += [(rng.dirichlet(np.ones(8) * 0.3) * 20_000).astype(int).clip(1).tolist()]  # very unequal
    return cases


@pytest.mark.parametrize("sizes", _exhaustive_cases())
def test_exhaustive_blending_indices_bit_identical_to_cpp(sizes):
    """A blend of size None (every sample of every dataset once) against megatron-core's C++."""
    from megatron.core.datasets import helpers_cpp

    total = sum(sizes)
    ref = np.zeros(total, dtype=np.int16), np.zeros(total, dtype=np.int64)
    helpers_cpp.build_exhaustive_blending_indices(*ref, np.asarray(sizes, dtype=np.int64), len(sizes))
    ours = exhaustive_blending_indices(sizes)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_one_epoch_single_prefix_and_unweighted_blend(prefixes, tmp_path):
    """ONE_EPOCH is megatron-core's size None, NeMo's full-epoch training: one prefix's train and
    validation splits one exhaustive epoch each; an unweighted blend every sample of each dataset's
    epoch once (exhaustive blending indices); the same samples and cache files as megatron-core's."""
    split = "0.9, 0.1, 0"
    ref = M.build(([prefixes[0]], None), split=split, seq_length=16, seed=9, sizes=[None, None, None],
                  cache_dir=str(tmp_path / "mega"))
    ours = build_gpt_datasets(prefixes[0], seq_length=16, split=split, seed=9, num_samples=(ONE_EPOCH, ONE_EPOCH, 0),
                              cache_dir=str(tmp_path / "ours"), tokenizer=M.FakeTokenizer())
    for r, o in zip(ref[:2], ours[:2]):
        assert len(o) == len(r) and o.num_epochs == 1
        for i in [0, 1, len(o) // 2, len(o) - 1]:
            np.testing.assert_array_equal(o[i]["input_ids"], M.tokens_of(r, i)[:-1])
    assert ours[2] is None
    blend = prefixes[1:4]
    ref = M.build((blend, None), split=split, seq_length=16, seed=9, sizes=[None, None, None],
                  cache_dir=str(tmp_path / "mega"))
    ours = build_gpt_datasets(blend, seq_length=16, split=split, seed=9, num_samples=(ONE_EPOCH, ONE_EPOCH, 0),
                              cache_dir=str(tmp_path / "ours"), tokenizer=M.FakeTokenizer())
    for r, o in zip(ref[:2], ours[:2]):
        assert len(o) == sum(len(d) for d in r.datasets)
        assert_same_blend(r, o)
    assert any("BlendedDataset" in name for name in _compare_caches(tmp_path))


def test_one_epoch_of_a_weighted_blend_is_an_error(prefixes):
    """megatron-core asserts that a size of None comes with no weights: a weighted blend needs a size."""
    with pytest.raises(UserError, match=r"dataset.paths: the train split is a weighted blend, which needs a number of samples"):
        build_gpt_datasets(["1", prefixes[0], "2", prefixes[1]], seq_length=16, split="1", num_samples=(ONE_EPOCH, 0, 0))


def assert_same_blend(ref, ours, *, samples=250):
    assert len(ours) == len(ref)
    np.testing.assert_array_equal(np.asarray(ours.dataset_index), ref.dataset_index)
    np.testing.assert_array_equal(np.asarray(ours.dataset_sample_index), ref.dataset_sample_index)
    for r, o in zip(ref.datasets, ours.datasets):
        assert len(o) == len(r)
        np.testing.assert_array_equal(np.asarray(o.shuffle_index), r.shuffle_index)
    picks = np.unique(np.linspace(0, len(ours) - 1, samples).astype(np.int64))
    batch = ours.get_batch(picks)
    for row, i in enumerate(picks):
        expected = M.tokens_of(ref, int(i))
        item = ours[int(i)]
        np.testing.assert_array_equal(item["input_ids"], expected[:-1])
        np.testing.assert_array_equal(item["labels"], expected[1:])
        np.testing.assert_array_equal(batch["input_ids"][row], expected[:-1])


def _compare_caches(tmp_path):
    mega, mine = M.list_cache(str(tmp_path / "mega")), M.list_cache(str(tmp_path / "ours"))
    assert set(mine) <= set(mega)
    for name in mine:
        assert mine[name] == mega[name], name
    return mine


def test_weighted_three_way_blend(prefixes, tmp_path):
    p = prefixes[:3]
    sizes = (3000, 150, 60)
    ref = M.build((p, [30.0, 50.0, 20.0]), split="90,5,5", seq_length=16, seed=1234, sizes=sizes,
                  cache_dir=str(tmp_path / "mega"))
    ours = build_gpt_datasets(["30", p[0], "50", p[1], "20", p[2]], seq_length=16, split="90,5,5", seed=1234,
                              num_samples=sizes, cache_dir=str(tmp_path / "ours"), tokenizer=M.FakeTokenizer())
    for r, o in zip(ref, ours):
        assert_same_blend(r, o)
    names = _compare_caches(tmp_path)
    assert sum("BlendedDataset" in n for n in names) == 9


def test_unweighted_glob_sorted_as_strings(prefixes, tmp_path):
    pattern = os.path.join(os.path.dirname(prefixes[0]), "shard_*_text_document.*")
    ordered = sorted(prefixes)  # as strings: shard_0_, shard_10_, shard_11_, shard_1_, shard_2_, ...
    assert ordered[1].endswith("shard_10_text_document")
    sizes = (4000, 200, 0)
    ref = M.build((ordered, None), split="0.95, 0.05, 0.00", seq_length=16, seed=1234, sizes=[4000, 200, None],
                  cache_dir=str(tmp_path / "mega"))
    ours = build_gpt_datasets(pattern, seq_length=16, split="0.95, 0.05, 0.00", seed=1234, num_samples=sizes,
                              cache_dir=str(tmp_path / "ours"), tokenizer=M.FakeTokenizer())
    assert [d.dataset_path for d in ours[0].datasets] == ordered
    assert_same_blend(ref[0], ours[0])
    assert_same_blend(ref[1], ours[1])
    assert ours[2] is None
    _compare_caches(tmp_path)


def test_unweighted_blend_capped_at_one_epoch(prefixes, tmp_path):
    """Far more samples asked of an unweighted blend than it has: megatron-core caps it at one pass."""
    ref = M.build((prefixes[:2], None), split="1", seq_length=16, seed=1, sizes=[10**7, None, None],
                  cache_dir=str(tmp_path / "mega"))[0]
    ours = build_gpt_datasets(prefixes[:2], seq_length=16, split="1", seed=1, num_samples=(10**7, 0, 0),
                              cache_dir=str(tmp_path / "ours"), tokenizer=M.FakeTokenizer())[0]
    assert len(ours) == len(ref) == sum(len(d) for d in ref.datasets) < 10**7
    assert all(d.num_epochs == 1 for d in ours.datasets)
    assert_same_blend(ref, ours)


@pytest.mark.parametrize("seed", [1234, 7])
def test_per_split_dict_and_json_file(prefixes, tmp_path, seed):
    paths = {"train": ["1", prefixes[0], "2", prefixes[1]], "validation": prefixes[3],
             "test": [prefixes[4], prefixes[5]]}
    spec = tmp_path / "paths.json"
    spec.write_text(json.dumps(paths))
    sizes = (3000, 80, 60)
    ref = M.build(None, [([prefixes[0], prefixes[1]], [1.0, 2.0]), ([prefixes[3]], None),
                         ([prefixes[4], prefixes[5]], None)],
                  seq_length=16, seed=seed, sizes=sizes, cache_dir=str(tmp_path / "mega"))
    ours = build_gpt_datasets(str(spec), seq_length=16, seed=seed, num_samples=sizes,
                              cache_dir=str(tmp_path / "ours"), tokenizer=M.FakeTokenizer())
    assert_same_blend(ref[0], ours[0])
    assert len(ours[1]) == len(ref[1])
    for i in range(0, len(ours[1]), 37):
        np.testing.assert_array_equal(ours[1][i]["input_ids"], M.tokens_of(ref[1], i)[:-1])
    assert_same_blend(ref[2], ours[2])
    _compare_caches(tmp_path)


def test_paths_forms_give_the_same_datasets(prefixes):
    kw = dict(seq_length=16, split="98,2,0", seed=3, num_samples=(500, 0, 0))
    plain = build_gpt_datasets(prefixes[:2], **kw)[0]
    with_suffix = build_gpt_datasets([prefixes[0] + ".bin", prefixes[1] + ".idx"], **kw)[0]
    np.testing.assert_array_equal(plain.get_batch(np.arange(64))["input_ids"],
                                  with_suffix.get_batch(np.arange(64))["input_ids"])
    single = build_gpt_datasets(prefixes[0], **kw)[0]
    weighted_single = build_gpt_datasets(["5", prefixes[0]], **kw)[0]  # one path: weights dropped
    np.testing.assert_array_equal(np.asarray(single.shuffle_index), np.asarray(weighted_single.shuffle_index))
    numbers = build_gpt_datasets([1, prefixes[0], 3, prefixes[1]], **kw)[0]
    strings = build_gpt_datasets(["1", prefixes[0], "3", prefixes[1]], **kw)[0]
    np.testing.assert_array_equal(np.asarray(numbers.dataset_index), np.asarray(strings.dataset_index))


def test_splits_to_build(prefixes):
    train, valid, test = build_gpt_datasets(prefixes[:2], seq_length=16, split="90,5,5", num_samples=(100, 10, 10),
                                            splits_to_build="validation")
    assert train is None and test is None and len(valid) == 10


# -- errors -----------------------------------------------------------------------------------------


def test_error_glob_matches_nothing(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        build_gpt_datasets(str(tmp_path / "nothing_*"), seq_length=8, num_samples=(10, 0, 0))


def test_error_glob_matches_other_files(prefixes, tmp_path):
    (tmp_path / "a_text_document.txt").write_text("x")
    with pytest.raises(UserError, match="not a .bin or .idx"):
        build_gpt_datasets(str(tmp_path / "a_*"), seq_length=8, num_samples=(10, 0, 0))


@pytest.mark.parametrize("weights", [("x", "2"), ("0", "-1"), ("0", "1"), ("nan", "1"), ("inf", "1")])
def test_error_bad_weights(prefixes, weights):
    paths = [weights[0], prefixes[0], weights[1], prefixes[1]]
    with pytest.raises(UserError, match="weight"):
        build_gpt_datasets(paths, seq_length=8, num_samples=(10, 0, 0))


def test_error_missing_prefix_in_blend(prefixes, tmp_path):
    with pytest.raises(UserError, match="no such dataset prefix"):
        build_gpt_datasets(["1", prefixes[0], "1", str(tmp_path / "gone")], seq_length=8, num_samples=(10, 0, 0))


def test_error_missing_split_in_dict(prefixes):
    with pytest.raises(UserError, match="no validation entry"):
        build_gpt_datasets({"train": prefixes[0]}, seq_length=8, num_samples=(10, 5, 0))
