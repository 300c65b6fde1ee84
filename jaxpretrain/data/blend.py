"""Blends: what `paths` means, Megatron's blending indices, the blended dataset, and the builder.

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
"""

from __future__ import annotations

import concurrent.futures
import glob as globlib
import json
import math
import os
from typing import Sequence

import numpy as np

from jaxpretrain.data import gpt_dataset as gd
from jaxpretrain.data import vocab_check
from jaxpretrain.data.indexed import IndexedDataset, get_prefix
from jaxpretrain.errors import UserError

# Megatron's `mid_level_dataset_surplus`: weighted blends build this much more of every dataset.
MID_LEVEL_DATASET_SURPLUS = 0.005

_PATH_SPLIT_KEYS = {"train": 0, "validation": 1, "valid": 1, "test": 2}
SPLIT_LABELS = ("train", "validation", "test")


# == Blending indices ===============================================================================
#
# Megatron (helpers.cpp, build_blending_indices): for sample s, pick the dataset i with the largest
# deficit `w[i] * max(s, 1) - count[i]` (first index on ties), in doubles. A plain Python loop would
# take seconds per million samples, so instead, chunk by chunk:
#
# 1. Candidate: the datasets' next samples merged in order of their release key count / w (the step
#    where the deficit turns positive), near-equal keys heaviest first. Mostly this is the greedy order.
# 2. Pre-pass: where the next candidate would have the larger deficit, defer the earlier one to the
#    first step where it would win (light datasets wait while heavier ones catch up).
# 3. Proof: a step is right if the candidate's deficit, computed exactly as Megatron does, beats every
#    other dataset's. The next _LOOK runs are compared exactly; every later sample of a weight class
#    is bounded by `w_max(class) * (s - smallest key)`.
# 4. Steps the proof cannot settle are recomputed exactly from the counts; a wrong step is repaired by
#    moving the greedy's pick forward (and the displaced sample to where it would win), and the steps
#    whose counts changed are checked again.
# 5. What stays unproven is cut off; where a chunk fails early, the plain loop runs for a while.
#
# Every emitted step is proven, so the result is Megatron's bit for bit (tests compare against the
# C++); only the speed depends on how good the candidate is.

_LOOK = 2                # runs after the candidate compared exactly
_KEY_GRID = 2.0 ** 20    # keys this close sort as ties (the heavier dataset first)
_MARGIN = 2.0 ** -40     # relative slack for the rounding of w * s and of the keys
_PRE_ROUNDS = 6
_REPAIR_ROUNDS = 32
_PUSH = 64               # how far one step may defer a sample
_MAX_CHUNK = 1 << 16


def _greedy_steps(w: np.ndarray, counts: np.ndarray, start: int, stop: int, out_ds, out_k) -> None:
    """Megatron's loop verbatim (Python floats are the same IEEE doubles)."""
    wl = w.tolist()
    c = counts.tolist()
    n = len(wl)
    for s in range(start, stop):
        sd = float(max(s, 1))
        best, best_e = 0, wl[0] * sd - c[0]
        for i in range(1, n):
            e = wl[i] * sd - c[i]
            if e > best_e:
                best, best_e = i, e
        out_ds[s] = best
        out_k[s] = c[best]
        c[best] += 1
    counts[:] = c


_PUSH_WINDOWS = (8, 32, _PUSH)


def _push_targets(w, ids, ms, g, own, nxt, at, skip=None, stage=0):
    """For the sample at each position in `at`: the first later position p where it would beat the
    sample that then sits at p: the one at p + 1 (deficit `nxt[p]` at step p), or, while p is before
    `skip` (a position about to be vacated), the one at p (`own[p]`). Short windows first, longer ones
    only for the samples not placed yet."""
    k = len(ids)
    window = _PUSH_WINDOWS[stage]
    e_id = ids[at]
    p = at[:, None] + np.arange(1, window + 1)[None, :]
    pc = np.minimum(p, k - 1)
    if skip is None:
        theirs, their_pos, off = nxt[pc], np.minimum(pc + 1, k - 1), p + 1 >= k
    else:
        before = p < skip[:, None]
        theirs = np.where(before, own[pc], nxt[pc])
        their_pos = np.where(before, pc, np.minimum(pc + 1, k - 1))
        off = np.where(before, p, p + 1) >= k
    mine = w[e_id][:, None] * g[pc] - ms[at][:, None]
    beat = (mine > theirs) | off
    tie = mine == theirs
    if tie.any():
        beat |= tie & (e_id[:, None] < ids[their_pos])
    found = beat.any(axis=1)
    v = at + 1 + np.where(found, beat.argmax(axis=1), window - 1)
    if stage + 1 < len(_PUSH_WINDOWS) and not found.all():
        far = np.flatnonzero(~found)
        v[far] = _push_targets(w, ids, ms, g, own, nxt, at[far], None if skip is None else skip[far], stage + 1)
    return np.minimum(v, k - 1)


def _deficits(w, ids, ms, g, at=None):
    """(own, nxt): each sample's deficit at its step, and its successor's deficit at that step, as
    Megatron computes them; for all positions or, into existing arrays, for the positions `at`."""
    k = len(ids)
    if at is None:
        own = w[ids] * g - ms
        nxt = np.full(k, -np.inf)
        nxt[:-1] = w[ids[1:]] * g[:-1] - ms[1:]
        return own, nxt
    own, nxt, at = at
    own[at] = w[ids[at]] * g[at] - ms[at]
    inner = at[at < k - 1]
    nxt[inner] = w[ids[inner + 1]] * g[inner] - ms[inner + 1]
    return own, nxt


def _rearrange(ids, ms, t, end, sources):
    """Rewrite windows [t, end] (disjoint); `sources(flat, lens, heads)` gives each slot's old slot."""
    lens = end - t + 1
    heads = np.concatenate(([0], np.cumsum(lens[:-1])))
    flat = np.repeat(t - heads, lens) + np.arange(int(lens.sum()))
    src = sources(flat, lens, heads)
    ids[flat] = ids[src]
    ms[flat] = ms[src]
    return flat, heads


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's `(dataset_index int16[size], dataset_sample_index int64[size])` for these weights."""
    w = np.asarray(weights, dtype=np.float64)
    out_ds = np.empty(size, dtype=np.int16)
    out_k = np.empty(size, dtype=np.int64)
    if len(w) == 1:
        out_ds[:] = 0
        out_k[:] = np.arange(size)
        return out_ds, out_k
    blender = _Blender(w)
    counts = np.zeros(len(w), dtype=np.int64)
    s = min(size, 2)  # samples 0 and 1 both use max(s, 1) = 1: the plain loop
    _greedy_steps(w, counts, 0, s, out_ds, out_k)
    chunk, loop_run = 1 << 14, 256
    while s < size:
        k = min(chunk, size - s)
        ids, ms, accepted, pick = blender.chunk(counts, s, k)
        out_ds[s:s + accepted] = ids[:accepted]
        out_k[s:s + accepted] = ms[:accepted]
        counts += np.bincount(ids[:accepted], minlength=len(w))
        s += accepted
        if pick is not None:
            out_ds[s], out_k[s] = pick
            counts[pick[0]] += 1
            s += 1
        if accepted == k:
            chunk = min(_MAX_CHUNK, chunk * 2)
            if k >= 4096:
                loop_run = 256
        elif accepted < 64:  # the candidate keeps failing here: let the plain loop pass this stretch
            stop = min(size, s + loop_run)
            _greedy_steps(w, counts, s, stop, out_ds, out_k)
            s = stop
            loop_run = min(loop_run * 2, 1 << 14)
            chunk = 1024
        else:
            chunk = max(1024, min(chunk, 4 * (accepted + 1)))
    return out_ds, out_k


class _Blender:
    """One chunk of steps at a time: candidate, pre-pass, proof, repairs (see the comment above)."""

    def __init__(self, w: np.ndarray):
        n = len(w)
        self.w, self.n = w, n
        self.perm = np.lexsort((np.arange(n), -w))  # candidate order among equal keys: heaviest first
        self.w_p = w[self.perm]
        self.inv = 1.0 / w
        self.inv_p = self.inv[self.perm]
        # weight classes for the bound on far samples: [w_max/2, w_max], [w_max/4, w_max/2), ...
        self.cls = np.minimum(np.floor(np.log2(w.max() / w)), 3).astype(np.int64)
        self.classes = [(c, w[self.cls == c].max(), w[self.cls == c].min()) for c in range(4) if (self.cls == c).any()]
        self.cls_ext = np.append(self.cls, -1)  # index n: "no sample" padding
        self.w_ext = np.append(w, 0.0)
        self.inv_ext = np.append(self.inv, 0.0)

    def chunk(self, counts, s: int, k: int):
        """(ids, ms, accepted, pick): the proven first `accepted` steps from step s on (dataset and
        its sample index), and the exact pick at the step after them when a repair stopped there."""
        g = np.arange(s, s + k, dtype=np.float64)
        ids, ms, later_ids, later_ms, beyond = self._candidate(counts, s, k)
        own, nxt, neighbours_ok = self._pre_pass(ids, ms, g)
        check = self._unproven(ids, ms, g, own, neighbours_ok, later_ids, later_ms, beyond)
        accepted, pick = self._repair(counts, ids, ms, g, check)
        return ids, ms, accepted, pick

    def _candidate(self, counts, s, k):
        """1. The next samples of every dataset merged by release key count / w."""
        n, perm = self.n, self.perm
        c_p = counts[perm]
        horizon = float(s + k + n)
        while True:
            hi = np.maximum(c_p, np.floor(horizon * self.w_p).astype(np.int64) + 1)
            per = hi - c_p
            if per.sum() > k:
                break
            horizon += k
        total = int(per.sum())
        starts = np.concatenate(([0], np.cumsum(per[:-1])))
        seg = np.repeat(np.arange(n), per)
        m = np.arange(total, dtype=np.int64) - (starts - c_p)[seg]
        keys = m * self.inv_p[seg]
        order = np.argsort(np.rint(keys * _KEY_GRID), kind="stable")
        all_ids = perm[seg[order]]
        all_ms = m[order]
        beyond = float(np.min(hi * self.inv_p))  # no sample left out of the merge has a smaller key
        return all_ids[:k].copy(), all_ms[:k].copy(), all_ids[k:], all_ms[k:], beyond

    def _pre_pass(self, ids, ms, g):
        """2. Defer each sample its successor beats, to where it would win; returns the deficits and
        whether every sample now beats its successor."""
        w, k = self.w, len(ids)
        own, nxt = _deficits(w, ids, ms, g)
        look = None
        for _ in range(_PRE_ROUNDS):
            if look is None:
                wrong = np.flatnonzero((nxt > own) | ((nxt == own) & (np.append(ids[1:], self.n) < ids)))
            else:
                succ = ids[np.minimum(look + 1, k - 1)]
                lose = (nxt[look] > own[look]) | ((nxt[look] == own[look]) & (succ < ids[look]))
                wrong = look[lose & (look < k - 1)]
            if not len(wrong):
                return own, nxt, True
            v = _push_targets(w, ids, ms, g, own, nxt, wrong)
            take = wrong > np.maximum.accumulate(np.concatenate(([-1], v[:-1])))  # disjoint windows
            t = wrong[take]

            def shift_left(flat, lens, heads, t=t):
                src = flat + 1
                src[heads + lens - 1] = t
                return src

            flat, _ = _rearrange(ids, ms, t, v[take], shift_left)
            # new neighbour conflicts can only appear around the moved windows
            dirty = np.zeros(k, dtype=bool)
            dirty[flat] = True
            dirty[np.maximum(flat - 1, 0)] = True
            dirty[wrong[~take]] = True
            look = np.flatnonzero(dirty)
            _deficits(w, ids, ms, g, (own, nxt, look))
        return own, nxt, False

    def _unproven(self, ids, ms, g, own, neighbours_ok, later_ids, later_ms, beyond):
        """3. The steps the bounds cannot prove. A step is right if the candidate's deficit beats every
        other dataset's: the next _LOOK runs exactly, every sample after them through its class bound."""
        n, k = self.n, len(ids)
        tail = min(len(later_ids), _LOOK + 1)
        pad = _LOOK + 2 - tail
        ext_id = np.concatenate((ids, later_ids[:tail], np.full(pad, n)))
        ext_m = np.concatenate((ms, later_ms[:tail], np.zeros(pad, dtype=np.int64)))
        ext_w = self.w_ext[ext_id]
        ext_key = self.inv_ext[ext_id] * ext_m
        ext_key[k + tail:] = beyond
        safe = np.ones(k, dtype=bool)
        ties = (ext_key[1:] == ext_key[:-1]) & (ext_w[1:] == ext_w[:-1])
        everyone = slice(0, k)
        if ties.any():
            # a run: equal key and weight (so equal deficits), ascending index; only its first can win
            first = np.ones(len(ext_id), dtype=bool)
            first[1:] = ~ties | (ext_id[1:] <= ext_id[:-1])
            run_first = np.flatnonzero(first)
            run_of = np.cumsum(first[:k]) - 1
            later = [run_first[np.minimum(run_of + d, len(run_first) - 1)] for d in range(1, _LOOK + 2)]
            checks = [(everyone, p) for p in later[:-1]]
        else:
            later = [slice(d, d + k) for d in range(1, _LOOK + 2)]
            checks = [(everyone, p) for p in later[:-1]]
            if neighbours_ok:  # the pre-pass compared each sample with its successor; left: the last one
                checks[0] = (slice(k - 1, k), slice(k, k + 1))
        for mine_at, p in checks:
            theirs = ext_w[p] * g[mine_at] - ext_m[p]
            mine = own[mine_at]
            safe[mine_at] &= (mine > theirs) | ((mine == theirs) & (ids[mine_at] < ext_id[p]))
        # after those, per weight class: a deficit is at most w * (s - smallest key of the class)
        p = later[-1]
        rest = np.full(k, -np.inf)
        far_ids = later_ids[tail:]
        far_keys = self.inv[far_ids] * later_ms[tail:]
        ext_cls = self.cls_ext[ext_id]
        for c, c_max, c_min in self.classes:
            key_c = np.where(ext_cls == c, ext_key, np.inf)
            in_c = self.cls[far_ids] == c
            key_c[k + tail:] = min(beyond, float(far_keys[in_c].min())) if in_c.any() else beyond
            x = g - np.minimum.accumulate(key_c[::-1])[::-1][p]
            # w * x is largest at w = c_max when x >= 0, at w = c_min when x < 0
            np.maximum(rest, np.maximum(c_max * x, c_min * x), out=rest)
        safe &= own - rest > _MARGIN * (g + 2.0)
        return np.flatnonzero(~safe)

    def _repair(self, counts, ids, ms, g, check):
        """4. Exact checks of the unproven steps from the counts; a wrong step gets the greedy's pick
        (pulled forward) and the sample it displaces goes where it would win; the steps whose counts
        changed are checked again. Returns (proven steps, exact pick after them or None)."""
        w, n, k = self.w, self.n, len(ids)
        for _ in range(_REPAIR_ROUNDS):
            if not len(check):
                return k, None
            pos = [np.flatnonzero(ids == j) for j in range(n)]
            cnt = np.empty((n, len(check)), dtype=np.int64)
            for j in range(n):
                cnt[j] = counts[j] + np.searchsorted(pos[j], check)
            best = (w[:, None] * g[check][None, :] - cnt).argmax(axis=0)  # Megatron's pick, exactly
            bad = best != ids[check]
            if not bad.any():
                return k, None
            wrong, wbest = check[bad], best[bad]
            wk = cnt[wbest, np.flatnonzero(bad)]
            u = np.full(len(wrong), k, dtype=np.int64)  # where the greedy's pick sits now (k: beyond)
            for j in np.unique(wbest):
                sel = wbest == j
                r = wk[sel] - counts[j]
                ok = r < len(pos[j])
                u_j = np.full(len(r), k, dtype=np.int64)
                u_j[ok] = pos[j][r[ok]]
                u[sel] = u_j
            if u[0] >= k:
                return int(wrong[0]), (int(wbest[0]), int(wk[0]))
            uc = np.minimum(u, k - 1)
            own, nxt = _deficits(w, ids, ms, g)
            v = _push_targets(w, ids, ms, g, own, nxt, wrong, uc)
            end = np.maximum(uc, v)
            take = (wrong > np.maximum.accumulate(np.concatenate(([-1], end[:-1])))) & (u < k)
            t, uu, vv = wrong[take], u[take], v[take]

            def pull_and_push(flat, lens, heads, t=t, uu=uu, vv=vv):
                # slot t gets the pick from uu; the sample from t goes to vv; the rest close up
                T, U, V = np.repeat(t, lens), np.repeat(uu, lens), np.repeat(vv, lens)
                src = np.where(flat < V, np.where(flat < U, flat, flat + 1),
                               np.where(flat == V, T, np.where(flat > U, flat, flat - 1)))
                src[heads] = uu
                return src

            flat, heads = _rearrange(ids, ms, t, end[take], pull_and_push)
            check = np.union1d(np.delete(flat, heads), wrong[~take])
        return (int(check[0]), None) if len(check) else (k, None)


# == What `paths` means =============================================================================


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _expand(entry: str) -> list[str]:
    """A glob -> the sorted unique prefixes of its `.bin`/`.idx` matches (Automodel's
    `get_list_of_files`); anything else is one prefix (given with or without `.bin`/`.idx`)."""
    entry = entry.strip()
    if not _is_glob(entry):
        return [get_prefix(entry)]
    matches = globlib.glob(entry)
    if not matches:
        raise UserError(f"dataset.paths: {entry!r} matches no files")
    prefixes = set()
    for path in matches:
        if not path.endswith((".bin", ".idx")):
            raise UserError(f"{path}: matched by {entry!r} but not a .bin or .idx file")
        prefixes.add(os.path.splitext(path)[0])
    return sorted(prefixes)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_blend(spec, where: str = "dataset.paths") -> tuple[list[str], list[float] | None]:
    """One distribution: (prefixes, weights or None), as Megatron's `get_blend_from_list`."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        return _expand(spec), None
    if not isinstance(spec, (list, tuple)) or not spec:
        raise UserError(f"{where}: expected a glob, a prefix or a non-empty list, got {spec!r}")
    items = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in spec]
    numeric = [_is_number(x) for x in items[::2]]
    if len(items) % 2 == 0 and any(numeric):
        if not all(numeric) or any(_is_number(x) for x in items[1::2]):
            raise UserError(
                f"{where}: a weighted list alternates numbers and prefixes: [w1, p1, w2, p2, ...]; got {spec!r}"
            )
        weights = [float(x) for x in items[::2]]
        bad = [x for x in weights if not (x > 0 and math.isfinite(x))]
        if bad:
            raise UserError(f"{where}: weights must be positive numbers, got {bad[0]!r}")
        prefixes = []
        for p in items[1::2]:
            if not isinstance(p, str):
                raise UserError(f"{where}: {p!r} is not a path")
            expanded = _expand(p)
            if len(expanded) != 1:
                raise UserError(
                    f"{where}: the weighted entry {p!r} must name one prefix, not a glob of {len(expanded)}"
                )
            prefixes += expanded
        return prefixes, weights
    prefixes = []
    for p in items:
        if not isinstance(p, str):
            raise UserError(f"{where}: {p!r} is not a path")
        prefixes += _expand(p)
    return prefixes, None


def parse_paths(paths):
    """`paths` -> ("blend", (prefixes, weights)) for one distribution split by `split`, or
    ("per_split", [blend or None] * 3) for a train/validation/test dict."""
    if isinstance(paths, os.PathLike):
        paths = os.fspath(paths)
    if isinstance(paths, str) and paths.strip().endswith(".json") and not _is_glob(paths):
        try:
            with open(paths.strip()) as f:
                paths = json.load(f)
        except OSError as e:
            raise UserError(f"{paths}: cannot read ({e.strerror})") from None
        except ValueError as e:
            raise UserError(f"{paths}: not valid JSON ({e})") from None
    if isinstance(paths, dict):
        unknown = set(paths) - set(_PATH_SPLIT_KEYS)
        if unknown:
            raise UserError(f"dataset.paths: unknown split keys {sorted(unknown)} (use train, validation, test)")
        blends = [None, None, None]
        for key, value in paths.items():
            if value is not None:
                blends[_PATH_SPLIT_KEYS[key]] = parse_blend(value, f"dataset.paths[{key!r}]")
        return "per_split", blends
    prefixes, weights = parse_blend(paths)
    if len(prefixes) == 1:
        weights = None  # Automodel: one path is used as is
    return "blend", (prefixes, weights)


def _check_prefixes(prefixes) -> None:
    for prefix in prefixes:
        idx, bin_ = prefix + ".idx", prefix + ".bin"
        if not os.path.isfile(idx) and not os.path.isfile(bin_):
            raise UserError(f"{prefix}: no such dataset prefix (neither .bin nor .idx exists)")


# == The blended dataset ============================================================================


class BlendedDataset:
    """Megatron's BlendedDataset: sample i is sample `dataset_sample_index[i]` of dataset
    `dataset_index[i]`; the indices are cached as `{md5}-BlendedDataset-{split}-*`.

    The constructor plans (identity, cache name); `build()` makes or loads the indices.
    """

    def __init__(self, datasets, weights, size: int, split: str, cache_dir: str | None):
        self.datasets = list(datasets)
        self.weights = gd.normalize(weights)
        self.size = int(size)
        self.split = split
        self.cache_dir = cache_dir
        self.seq_length = self.datasets[0].seq_length
        self.unique_identifiers = {
            "class": "BlendedDataset",
            "datasets": [d.unique_identifiers for d in self.datasets],
            "split": split,
            "weights": self.weights,
            "size": self.size,
        }
        self.unique_description = gd.describe(self.unique_identifiers)
        self.unique_description_hash = gd.description_hash(self.unique_description)
        self.cache_base = f"{self.unique_description_hash}-BlendedDataset-{split}"
        self.dataset_index = self.dataset_sample_index = None

    _NAMES = ("dataset_index", "dataset_sample_index")

    def _shapes(self) -> dict:
        return {name: (self.size,) for name in self._NAMES}

    def is_cached(self) -> bool:
        return gd.cache_complete(self.cache_dir, self.cache_base, self._NAMES, self.unique_description, self._shapes())

    def build(self, compute=None) -> "BlendedDataset":
        """`compute()` -> (dataset_index, dataset_sample_index) replaces the in-process computation
        (the builder passes a background process's result)."""

        def make():
            dataset_index, dataset_sample_index = (compute or (lambda: blending_indices(self.weights, self.size)))()
            # Megatron's guard (checked when built; a cache hit was checked when it was written)
            self._check_sizes(dataset_index, dataset_sample_index)
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        arrays = gd.cached_arrays(
            self.cache_dir, self.cache_base, self._NAMES, self.unique_description, make, self._shapes()
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        return self

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
        if n is not None and (not isinstance(n, (int, np.integer)) or n < 0):
            raise UserError(f"num_samples: {SPLIT_LABELS[i]} must be a non-negative integer or None, got {n!r}")
    wanted = [bool(n) for n in sizes]
    if splits_to_build is not None:
        names = [splits_to_build] if isinstance(splits_to_build, str) else list(splits_to_build)
        for name in names:
            if name not in _PATH_SPLIT_KEYS:
                raise UserError(f"splits_to_build: unknown split {name!r} (use train, validation, test)")
        chosen = {_PATH_SPLIT_KEYS[name] for name in names}
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
                    f"split: {text!r} leaves the {SPLIT_LABELS[i]} split empty but {sizes[i]} samples were requested"
                )
            plans.append((i, prefixes, weights, matrix[i], text, matrix))
    else:
        for i in range(3):
            if not wanted[i]:
                continue
            if spec[i] is None:
                raise UserError(f"dataset.paths: no {SPLIT_LABELS[i]} entry but {sizes[i]} samples were requested")
            prefixes, weights = spec[i]
            plans.append((i, prefixes, weights, (0.0, 1.0), None, None))
    for plan in plans:
        _check_prefixes(plan[1])

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
            if len(prefixes) == 1:
                ds = gd.GPTDataset.planned(open_indexed(prefixes[0]), prefixes[0], lo, hi, sizes[i], name, config)
                jobs.append(ds.build)
                results[i] = ds
                continue
            if weights is not None:
                norm = gd.normalize(weights)
                target = _size_per_dataset(norm, sizes[i])
                buffer = _size_per_dataset(norm, sizes[i], MID_LEVEL_DATASET_SURPLUS)
                parts = [
                    gd.GPTDataset.planned(open_indexed(p), p, lo, hi, n, name, config) for p, n in zip(prefixes, buffer)
                ]
                blend_weights, blend_size = norm, sum(target)
            else:
                parts = [gd.GPTDataset.planned(open_indexed(p), p, lo, hi, None, name, config) for p in prefixes]
                blend_weights = [len(ds) for ds in parts]
                blend_size = min(sizes[i], sum(blend_weights))
            jobs += [ds.build for ds in parts]
            blended = BlendedDataset(parts, blend_weights, blend_size, name, cache_dir)
            background = None
            if background_blend and blend_size >= _BACKGROUND_BLEND_MIN and not blended.is_cached():
                background = pool.submit(blending_indices, blended.weights, blended.size)  # runs meanwhile
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


