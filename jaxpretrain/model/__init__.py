"""Model families in Flax NNX with Hugging Face interop, behind one registry (registry.py).

    import jaxpretrain.model as M
    model = M.from_pretrained("hf_dir", dtype=jnp.float32)   # any registered family
    logits = model(input_ids)                                # [B, T, vocab_size] float32
    M.save_pretrained(model, "out_dir")                      # AutoModelForCausalLM loads it

Nothing above this package names a family: `config_from` / `family_of` pick it from the config's
`model_type`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpretrain.model import gpt2
from jaxpretrain.model.build import abstract_model, create_model, default_mesh, sharded_init, state_shardings
from jaxpretrain.model.gpt2 import ACTIVATIONS, GPT2LMHeadModel
from jaxpretrain.model.hf import from_pretrained, hf_shape, save_pretrained
from jaxpretrain.model.registry import Family, config_from, families, family_of


def param_count(model: nnx.Module) -> int:
    """Number of parameters as Hugging Face counts them (vocabulary padding rows excluded)."""
    config = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return sum(
        int(np.prod(hf_shape(layout, flat[path].shape, config.vocab_size)))
        for _, path, layout in family_of(config).name_table(config)
    )


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of `config`'s model at this sequence length (the family's formula)."""
    return family_of(config).flops_per_token(config, seq_len)


def param_l2_norm(model_or_params) -> jax.Array:
    """Global L2 norm of all parameters (float32); padding rows are zero and add nothing."""
    params = model_or_params
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    return _global_l2_norm(jax.tree.leaves(params))


@jax.jit
def _global_l2_norm(leaves: list[jax.Array]) -> jax.Array:
    # One program for the whole tree: op by op, each parameter shape would compile (and, in a
    # multi-process run, launch) its own few small cross-process programs.
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


__all__ = [
    "ACTIVATIONS",
    "Family",
    "GPT2LMHeadModel",
    "abstract_model",
    "config_from",
    "create_model",
    "default_mesh",
    "families",
    "family_of",
    "flops_per_token",
    "from_pretrained",
    "gpt2",
    "param_count",
    "param_l2_norm",
    "save_pretrained",
    "sharded_init",
    "state_shardings",
]
