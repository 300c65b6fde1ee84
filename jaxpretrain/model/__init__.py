"""GPT-2 in Flax NNX with Hugging Face interop; see gpt2.py (the model) and hf.py (checkpoints)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpretrain.model.gpt2 import (
    ACTIVATIONS,
    GPT2LMHeadModel,
    abstract_model,
    config_from,
    create_model,
    sharded_init,
    state_shardings,
)
from jaxpretrain.model.hf import from_pretrained, save_pretrained


def param_count(model: GPT2LMHeadModel) -> int:
    """Number of parameters as Hugging Face counts them (vocabulary padding rows excluded)."""
    total = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return total - (model.padded_vocab_size - model.vocab_size) * model.wte.embedding.shape[1]


def param_l2_norm(model_or_params) -> jax.Array:
    """Global L2 norm of all parameters (float32); padding rows are zero and add nothing."""
    params = model_or_params
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    leaves = jax.tree.leaves(params)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


__all__ = [
    "ACTIVATIONS",
    "GPT2LMHeadModel",
    "abstract_model",
    "config_from",
    "create_model",
    "from_pretrained",
    "param_count",
    "param_l2_norm",
    "save_pretrained",
    "sharded_init",
    "state_shardings",
]
