"""model.scan_layers against the plain (unrolled) blocks: the same loss and gradients, the same
parameters, checkpoints and HF weights; remat composes with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import GPT2Config

import jaxpretrain.model as M
from jaxpretrain.errors import UserError
from jaxpretrain.train.step import model_ce_sum

CONFIG = dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=100, bos_token_id=0, eos_token_id=0)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 100, size=(2, 17))
    return {"input_ids": jnp.asarray(tokens[:, :-1]), "labels": jnp.asarray(tokens[:, 1:])}


def _loss_and_grads(model, batch, chunk, dropout):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        key = jax.random.key(7) if dropout else None
        ce, n = model_ce_sum(m, batch, chunk_size=chunk, deterministic=not dropout, rngs=key)
        return ce / n

    return jax.jit(jax.value_and_grad(loss))(params)


_plain_results = {}


@pytest.mark.parametrize("remat,dropout", [(False, 0.1), (True, 0.1), ("dots_with_no_batch_dims_saveable", 0.0)])
def test_scan_equals_unrolled(remat, dropout):
    config = GPT2Config(**CONFIG, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    scanned = M.create_model(config, seed=3, vocab_multiple=64, scan_layers=True, remat=remat)
    if dropout not in _plain_results:
        plain = M.create_model(config, seed=3, vocab_multiple=64)
        # The same parameter tree: checkpoints and HF name tables do not see the option.
        assert jax.tree.structure(nnx.state(plain, nnx.Param)) == jax.tree.structure(nnx.state(scanned, nnx.Param))
        _plain_results[dropout] = _loss_and_grads(plain, _batch(), 5, dropout > 0)
    lp, gp = _plain_results[dropout]
    ls, gs = _loss_and_grads(scanned, _batch(), 5, dropout > 0)  # chunked loss, dropout masks as unrolled
    np.testing.assert_allclose(float(ls), float(lp), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)


def test_scan_model_saves_and_loads_the_same_hf_weights(tmp_path):
    config = GPT2Config(**CONFIG)
    scanned = M.create_model(config, seed=4, scan_layers=True)
    M.save_pretrained(scanned, str(tmp_path / "hf"))
    loaded = M.from_pretrained(str(tmp_path / "hf"), scan_layers=True)
    plain = M.from_pretrained(str(tmp_path / "hf"))
    ids = _batch()["input_ids"]
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(plain(ids)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(plain(ids)), rtol=1e-5, atol=1e-6)


def test_layer_dependent_config_cannot_scan():
    with pytest.raises(UserError, match="model.scan_layers"):
        M.create_model(GPT2Config(**CONFIG, scale_attn_by_inverse_layer_idx=True), scan_layers=True)


def test_llama_scan_equals_unrolled():
    """The Llama family's blocks (rotary, GQA, SwiGLU) under the same scan, remat composed."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )
    plain = M.create_model(config, seed=5)
    scanned = M.create_model(config, seed=5, scan_layers=True, remat="dots_with_no_batch_dims_saveable")
    assert scanned.scan_layers and not plain.scan_layers
    assert jax.tree.structure(nnx.state(plain, nnx.Param)) == jax.tree.structure(nnx.state(scanned, nnx.Param))
    lp, gp = _loss_and_grads(plain, _batch(1), 0, False)
    ls, gs = _loss_and_grads(scanned, _batch(1), 5, False)
    np.testing.assert_allclose(float(ls), float(lp), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
