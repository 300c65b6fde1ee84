"""Inputs that make attention's output show its dropped probabilities, shared by the CPU and GPU tests.

With q = k = 0 every causal row of softmax is uniform (1 / (t + 1) over positions 0..t), and with
v[b, s, h] = one-hot(s) the output row out[b, t, h] is row t of the (dropped) probability matrix.
So one forward call reveals every mask entry and the scale kept entries got.
"""

import numpy as np


def probe_inputs(b: int, t: int, h: int, d: int, dtype=np.float32):
    assert d >= t, "the one-hot values need head_dim >= seq"
    q = np.zeros((b, t, h, d), dtype)
    v = np.zeros((b, t, h, d), dtype)
    v[:, np.arange(t), :, np.arange(t)] = 1.0
    return q, q.copy(), v


def causal_probs(t: int) -> np.ndarray:
    """The no-dropout probabilities [t, t]: 1 / (row + 1) on and below the diagonal."""
    return np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]


def check_dropped_probs(out: np.ndarray, rate: float, rtol: float = 1e-5) -> float:
    """Asserts out [B, T, H, >=T] is a dropout of the causal probabilities; returns the keep rate.

    Entries above the diagonal are 0; on and below it each is 0 or p / (1 - rate) (torch's inverted
    dropout scaling); the kept fraction is within 6 sigma of 1 - rate.
    """
    t = out.shape[1]
    probs = np.moveaxis(np.asarray(out, np.float64)[..., :t], 2, 1)  # [B, H, T, T]
    expected = causal_probs(t)
    causal = np.broadcast_to(np.tril(np.ones((t, t), bool)), probs.shape)
    assert not probs[~causal].any(), "no probability above the diagonal"
    kept = probs[causal] != 0
    scaled = np.broadcast_to(expected / (1.0 - rate), probs.shape)[causal]
    np.testing.assert_allclose(probs[causal][kept], scaled[kept], rtol=rtol)
    keep = kept.mean()
    sigma = np.sqrt(rate * (1 - rate) / kept.size)
    assert abs(keep - (1 - rate)) < 6 * sigma, (keep, 1 - rate, sigma)
    return float(keep)
