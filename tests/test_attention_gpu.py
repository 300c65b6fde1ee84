"""cuDNN fused attention with dropout (the GPU training path), checked on a GPU only.

Its masks come from cuDNN's own Philox stream, so they cannot equal the plain path's; what must hold
is what HF's dropout does: zeros above the diagonal, kept probabilities scaled by 1 / (1 - p), a keep
rate of 1 - p, an expected value equal to the deterministic output, the backward pass using the
forward's mask, and fresh masks on every call and for every seed (call site).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_probe import check_dropped_probs, probe_inputs
from jaxpretrain.model import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (none here)")

B, T, H, D, RATE = 4, 64, 2, 64, 0.1


def cudnn_dropout(q, k, v, seed=0, rate=RATE):
    return layers.attention(
        q, k, v, scale=D**-0.5, impl="cudnn", dtype=jnp.bfloat16, dropout_rate=rate,
        dropout_key=jax.random.key(0), dropout_seed=seed,  # the key only says "training"; cuDNN uses seed
    )


def probe():
    return tuple(jnp.asarray(x, jnp.bfloat16) for x in probe_inputs(B, T, H, D))


def test_masks_scaling_and_keep_rate_as_hf():
    q, k, v = probe()
    out = np.asarray(jax.jit(cudnn_dropout)(q, k, v).astype(jnp.float32))
    check_dropped_probs(out, RATE, rtol=1e-2)  # bf16 holds p / (1 - p) to ~3 digits


def test_fresh_masks_per_call_and_per_seed():
    q, k, v = probe()
    f = jax.jit(cudnn_dropout, static_argnames="seed")
    a, b = np.asarray(f(q, k, v).astype(jnp.float32)), np.asarray(f(q, k, v).astype(jnp.float32))
    c = np.asarray(f(q, k, v, seed=1).astype(jnp.float32))
    assert not np.array_equal(a, b), "a second call draws new masks"
    assert not np.array_equal(a, c), "another seed (layer) draws other masks"
    for x in (b, c):
        check_dropped_probs(x, RATE, rtol=1e-2)


def test_backward_uses_the_forward_mask():
    """With the probe, out = P_dropped (per head), so dv must be P_dropped^T @ g from the same call."""
    q, k, v = probe()
    g = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, H, D)), jnp.bfloat16)

    @jax.jit
    def out_and_dv(q, k, v, g):
        out, vjp = jax.vjp(lambda v: cudnn_dropout(q, k, v), v)
        return out, vjp(g)[0]

    out, dv = (np.asarray(x.astype(jnp.float32)) for x in out_and_dv(q, k, v, g))
    p = np.moveaxis(out[..., :T], 2, 1)  # [B, H, T(query), T(key)]
    expected = np.einsum("bhts,bthd->bshd", p, np.asarray(g.astype(jnp.float32)))
    np.testing.assert_allclose(dv, expected, rtol=3e-2, atol=3e-2)


def test_expected_value_equals_the_deterministic_path():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16) for _ in range(3))
    det = layers.attention(q, k, v, scale=D**-0.5, impl="cudnn", dtype=jnp.bfloat16)
    f = jax.jit(cudnn_dropout)
    n = 400
    draws = [np.asarray(f(q, k, v).astype(jnp.float32), np.float64) for _ in range(n)]
    mean, std = np.mean(draws, axis=0), np.std(draws, axis=0)
    # Each element's mean over n masks is within 6 standard errors (plus bf16 rounding) of det.
    err = np.abs(mean - np.asarray(det.astype(jnp.float32)))
    assert (err <= 6 * std / np.sqrt(n) + 2e-2).all(), float(err.max())
