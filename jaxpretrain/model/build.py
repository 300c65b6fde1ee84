"""Building any family's model sharded: shapes first, then one jitted init whose outputs are the
rules' shardings, so no device ever holds the whole model (the seed's `is_meta_device`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpretrain import parallel
from jaxpretrain.model.registry import config_from, family_of


def abstract_model(config, **model_kw) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as shapes only (nothing allocated)."""
    config = config_from(config)
    cls = family_of(config).model_class
    return nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **model_kw)))


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The same tree as `state`, each Variable holding the NamedSharding the rules give it."""

    def sharding(v: nnx.Variable):
        axes = v.get_metadata().get("out_sharding")
        return v.replace(parallel.logical_to_mesh_sharding(axes, mesh, v.shape))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def default_mesh() -> jax.sharding.Mesh:
    """The mesh used when none is given: this process's first device alone."""
    return parallel.make_mesh(devices=jax.local_devices()[:1])


def sharded_init(config, *, mesh: jax.sharding.Mesh, seed: int = 0, **model_kw):
    """(graphdef, init): `init()` is one jitted program returning the parameter State, its
    out_shardings the rules' shardings on `mesh`, so each device only computes its own shards."""
    config = config_from(config)
    cls = family_of(config).model_class
    graphdef, abstract_state = abstract_model(config, **model_kw)
    init = jax.jit(
        lambda: nnx.state(cls(config, rngs=nnx.Rngs(params=seed), **model_kw)),
        out_shardings=state_shardings(abstract_state, mesh),
    )
    return graphdef, init


def create_model(
    config=None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    attention_impl: str | None = None,
    vocab_multiple: int = 1,
    remat: bool | str = False,
    scan_layers: bool = False,
) -> nnx.Module:
    """A freshly initialised model of `config`'s family, its parameters born sharded over `mesh`."""
    graphdef, init = sharded_init(
        config, mesh=mesh or default_mesh(), seed=seed, dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl, vocab_multiple=vocab_multiple, remat=remat, scan_layers=scan_layers,
    )
    return nnx.merge(graphdef, init())
