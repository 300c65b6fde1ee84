"""Megatron's blending indices (`helpers.cpp`'s `build_blending_indices` and
`build_exhaustive_blending_indices`), bit for bit, vectorised.

`blending_indices(weights, size)` -> (dataset_index, dataset_sample_index): which dataset the blend's
sample s comes from, and which of that dataset's samples it is. The paths and the blended dataset
live in `data/paths.py` and `data/builder.py`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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


def exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's `build_exhaustive_blending_indices` (a blend of size None: every sample of every
    dataset once): the greedy of `blending_indices` with weights sizes[i] / total (the C++'s double
    division), except that a dataset whose samples are spent leaves the argmax.

    That exception never changes a step: a spent dataset's deficit w*s - size is negative before the
    end, while the deficits sum to 0, so some unspent dataset has one >= 0 and wins. So the fast greedy
    is run and checked: its counts equal `sizes` exactly when no step picked a spent dataset (counts
    only grow), i.e. when every step was the exhaustive one. Should rounding ever break the tie
    argument, the plain loop of the C++ gives the answer instead."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    weights = sizes / float(total)
    out_ds, out_k = blending_indices(weights, total)
    if np.array_equal(np.bincount(out_ds, minlength=len(sizes)), sizes):
        return out_ds, out_k
    return _exhaustive_loop(sizes, weights, total)


def _exhaustive_loop(sizes: np.ndarray, weights: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """helpers.cpp's loop verbatim (slow; only a fallback)."""
    out_ds, out_k = np.empty(total, dtype=np.int16), np.empty(total, dtype=np.int64)
    counts, w, left = [0] * len(sizes), weights.tolist(), [i for i in range(len(sizes)) if sizes[i] > 0]
    for s in range(total):
        sd = float(max(s, 1))
        best = max(left, key=lambda i: (w[i] * sd - counts[i], -i))  # first index on ties
        out_ds[s], out_k[s] = best, counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            left.remove(best)
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
