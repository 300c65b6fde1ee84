"""Attention dropout on the plain (XLA) path against HF's own eager attention (transformers' GPT-2)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from attention_probe import causal_probs, check_dropped_probs, probe_inputs
from jaxpretrain.model import layers

B, T, H, D, RATE = 4, 32, 2, 32, 0.1


def ours(q, k, v, key, rate=RATE):
    return layers.attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=D**-0.5, impl="xla", dtype=jnp.float32,
        dropout_rate=rate, dropout_key=key,
    )


def hf(q, k, v, rate=RATE):
    """transformers' GPT-2 eager attention in training mode, with the causal mask the model adds."""
    mask = torch.triu(torch.full((T, T), torch.finfo(torch.float32).min), diagonal=1)
    to_bhtd = lambda x: torch.tensor(x).transpose(1, 2)  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
    out, _ = eager_attention_forward(
        types.SimpleNamespace(training=True), to_bhtd(q), to_bhtd(k), to_bhtd(v), mask, scaling=D**-0.5, dropout=rate
    )
    return out.numpy()  # [B, T, H, D]


def test_dropout_masks_and_scaling_as_hf():
    q, k, v = probe_inputs(B, T, H, D)
    torch.manual_seed(0)
    keep_hf = check_dropped_probs(hf(q, k, v), RATE)
    out = np.asarray(ours(q, k, v, jax.random.key(0)))
    keep_ours = check_dropped_probs(out, RATE)
    # Both keep 1 - p of the probabilities (checked above within 6 sigma of 0.9 each).
    assert abs(keep_ours - keep_hf) < 0.03
    # Masks are drawn per batch row and per head, not shared.
    assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[:, :, 0], out[:, :, 1])
    # Without dropout both give the plain causal probabilities.
    np.testing.assert_allclose(np.moveaxis(hf(q, k, v, rate=0.0), 2, 1)[0, 0, :, :T], causal_probs(T), rtol=1e-6)
    plain = ours(q, k, v, None)
    np.testing.assert_allclose(np.moveaxis(np.asarray(plain), 2, 1)[0, 0, :, :T], causal_probs(T), rtol=1e-6)


def test_dropout_expected_value_is_the_no_dropout_output():
    """Random q, k, v: the mean over many masks equals the deterministic output, for ours and for HF."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 16, 2, 8)).astype(np.float32) for _ in range(3))
    d = 8
    det = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=d**-0.5, impl="xla", dtype=jnp.float32))
    n = 2000
    draw = jax.jit(jax.vmap(lambda key: layers.attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=d**-0.5, impl="xla", dtype=jnp.float32,
        dropout_rate=RATE, dropout_key=key,
    )))
    mean = np.asarray(draw(jax.random.split(jax.random.key(2), n))).mean(0)
    # Std of one output element over masks is about sqrt(p/(1-p)) * |v| / sqrt(t): bounded by 0.5 here.
    np.testing.assert_allclose(mean, det, atol=5 * 0.5 / np.sqrt(n))
    torch.manual_seed(3)
    mask = torch.triu(torch.full((16, 16), torch.finfo(torch.float32).min), diagonal=1)
    t = lambda x: torch.tensor(x).transpose(1, 2).expand(n, -1, -1, -1, -1).reshape(n * 2, 2, 16, d)  # noqa: E731
    hf_out, _ = eager_attention_forward(types.SimpleNamespace(training=True), t(q), t(k), t(v), mask, scaling=d**-0.5, dropout=RATE)
    hf_mean = hf_out.reshape(n, 2, 16, 2, d).mean(0).numpy()
    np.testing.assert_allclose(hf_mean, det, atol=5 * 0.5 / np.sqrt(n))


def test_explicit_cudnn_on_cpu_is_a_clear_error():
    from jaxpretrain.errors import UserError

    q, k, v = probe_inputs(1, 4, 1, 4)
    with pytest.raises(UserError, match="model.attention_impl"):
        layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=1.0, impl="cudnn", dtype=jnp.bfloat16)


def test_this_jax_has_the_cudnn_dropout_kernel_we_call():
    """The kernel is jax's private API: its module, function, MaskType.CAUSAL and the keywords we pass
    must exist in the installed jax (else training on a GPU falls back to the slow path, warning)."""
    import inspect

    fn = layers.cudnn_dropout_kernel()
    assert fn is not None
    assert {"scale", "mask_type", "seed", "dropout_rate", "qkv_layout"} <= set(inspect.signature(fn).parameters)


def test_without_the_cudnn_dropout_kernel_attention_falls_back_and_says_so(monkeypatch, capsys):
    """Where the cuDNN kernel would be chosen (a GPU, bfloat16) but this jax lacks the private dropout
    function, attention dropout runs on the spelled-out scores, with one warning line."""
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(layers, "cudnn_dropout_kernel", lambda: None)
    layers._warn_no_cudnn_dropout.cache_clear()
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in probe_inputs(B, T, H, D))
    key = jax.random.key(0)
    run = lambda: layers.attention(q, k, v, scale=D**-0.5, impl=None, dtype=jnp.bfloat16, dropout_rate=RATE, dropout_key=key)  # noqa: E731
    out, again = run(), run()
    want = layers.attention_with_dropout(q, k, v, scale=D**-0.5, rate=RATE, key=key)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(want, np.float32))
    err = capsys.readouterr().err
    assert err.count("warning: cuDNN's attention with dropout is not available in jax") == 1, err
    # and a layer scan is then allowed (the cuDNN kernel's call-order constraint does not apply)
    layers.check_scan_dropout(RATE, None, jnp.bfloat16, D)
