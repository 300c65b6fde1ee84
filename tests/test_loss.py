"""The chunked cross-entropy (its own VJP) against torch's `cross_entropy` and the plain logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxpretrain.train.loss import IGNORE_INDEX, masked_ce_sum, masked_ce_sum_from_logits


@pytest.fixture(autouse=True)
def _float32_matmuls_in_float32():
    # On a GPU, float32 matmuls default to TF32; the comparisons with float64 torch want float32.
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(b, t, d, v_padded, vocab, seed, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = (0.5 * rng.normal(size=(v_padded, d))).astype(np.float32)
    w[vocab:] = rng.normal(size=(v_padded - vocab, d))  # padding rows nonzero: the mask must hide them
    labels = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    labels[rng.random((b, t)) < ignore_frac] = IGNORE_INDEX
    return h, w, labels


def _torch_reference(h, w, labels, vocab, scale):
    """torch: sum-reduced cross_entropy(ignore_index=-100) of h @ w[:vocab].T, in float64."""
    th = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    logits = th @ tw[:vocab].T
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), torch.tensor(labels, dtype=torch.long).reshape(-1), ignore_index=-100, reduction="sum"
    )
    (scale * loss).backward()
    return loss.item(), th.grad.numpy(), tw.grad.numpy()


@pytest.mark.parametrize(
    "b,t,d,v_padded,vocab,chunk",
    [
        (2, 16, 8, 64, 50, 4),  # padded vocabulary, chunks dividing T
        (3, 13, 8, 40, 40, 5),  # no padding, an odd chunk that leaves a partial last chunk
        (1, 7, 16, 33, 31, 7),  # one chunk exactly
        (2, 9, 4, 24, 17, 100),  # chunk larger than T
        (2, 10, 8, 32, 30, 1),  # one position per chunk
    ],
)
def test_chunked_loss_and_grads_equal_torch_cross_entropy(b, t, d, v_padded, vocab, chunk):
    h, w, labels = _inputs(b, t, d, v_padded, vocab, seed=b * 100 + t)
    scale = 0.37  # an upstream cotangent that is not 1, as the train step's 1/label-tokens

    def f(h, w):
        ce, _ = masked_ce_sum(h, w, jnp.asarray(labels), vocab_size=vocab, chunk_size=chunk)
        return scale * ce

    (loss, (dh, dw)) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(w))
    ref_loss, ref_dh, ref_dw = _torch_reference(h, w, labels, vocab, scale)
    np.testing.assert_allclose(float(loss) / scale, ref_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw)[:vocab], ref_dw[:vocab], rtol=1e-5, atol=1e-6)
    assert not np.asarray(dw)[vocab:].any(), "padded vocabulary rows get no gradient"
    assert int(masked_ce_sum(h, w, labels, vocab_size=vocab, chunk_size=chunk)[1]) == int((labels != -100).sum())


def test_chunked_equals_plain_loss_in_bfloat16():
    """bf16 operands, float32 accumulation: the same loss and gradients as the plain logits path."""
    b, t, d, v_padded, vocab = 2, 32, 64, 256, 250
    h, w, labels = _inputs(b, t, d, v_padded, vocab, seed=7)
    h, w = jnp.asarray(h), jnp.asarray(w)

    def chunked(h, w):
        return masked_ce_sum(h, w, labels, vocab_size=vocab, chunk_size=12, compute_dtype=jnp.bfloat16)[0]

    def plain(h, w):
        logits = jnp.einsum("btd,vd->btv", h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return masked_ce_sum_from_logits(logits[..., :vocab], labels)[0]

    lc, gc = jax.value_and_grad(chunked, argnums=(0, 1))(h, w)
    lp, gp = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    assert gc[0].dtype == jnp.float32 and gc[1].dtype == jnp.float32  # grads in the inputs' dtypes
    np.testing.assert_allclose(float(lc), float(lp), rtol=1e-5)
    for a, p in zip(gc, gp):
        rel = float(jnp.linalg.norm(a - p) / jnp.linalg.norm(p))
        assert rel < 1e-2, rel  # bf16 operands round differently in the two orders of work


def test_all_labels_ignored_gives_zero_loss_and_grads():
    h, w, labels = _inputs(2, 6, 4, 16, 16, seed=3)
    labels[:] = IGNORE_INDEX
    ce, count = masked_ce_sum(h, w, labels, chunk_size=4)
    assert float(ce) == 0.0 and int(count) == 0
    dh, dw = jax.grad(lambda h, w: masked_ce_sum(h, w, labels, chunk_size=4)[0], argnums=(0, 1))(h, w)
    assert not np.asarray(dh).any() and not np.asarray(dw).any()


def test_bad_shapes_are_rejected():
    h, w, labels = _inputs(2, 6, 4, 16, 16, seed=3)
    with pytest.raises(ValueError, match="shapes"):
        masked_ce_sum(h, w[:, :3], labels)
    with pytest.raises(ValueError, match="vocab_size"):
        masked_ce_sum(h, w, labels, vocab_size=17)
    with pytest.raises(ValueError, match="chunk_size"):
        masked_ce_sum(h, w, labels, chunk_size=0)


def test_gradients_keep_the_inputs_dtypes():
    """bf16 hidden states and head weights (the model's compute dtype) get bf16 gradients."""
    h, w, labels = _inputs(2, 8, 8, 32, 30, seed=5)
    h, w = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    dh, dw = jax.grad(lambda h, w: masked_ce_sum(h, w, labels, vocab_size=30, chunk_size=3)[0], argnums=(0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
