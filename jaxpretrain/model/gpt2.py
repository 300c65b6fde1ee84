"""GPT-2 in Flax NNX: Hugging Face's `GPT2LMHeadModel`, parameter for parameter, built sharded.

The parameter tree mirrors HF's module names (wte, wpe, h.{i}.ln_1/attn/ln_2/mlp, ln_f) so the
name table in `hf.py` stays one line per tensor. Two layouts differ from HF, both for speed:
`c_attn` keeps its fused [embed, 3*embed] matmul but stores the kernel as [embed, 3, embed] so
tensor parallelism can split heads without splitting q from k and v; and `wte` may carry extra
zero rows (vocab_multiple) so the logits matmul has friendly sizes. Neither ever shows outside.

Every parameter names its axes (`out_sharding` metadata, logical names such as ("vocab", "embed"));
`jaxpretrain.parallel.LOGICAL_AXIS_RULES` turns them into mesh shardings. Parameters are float32
masters; the forward pass runs in `dtype` (bfloat16 on GPU) and returns float32 logits.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import GPT2Config

from jaxpretrain import parallel
from jaxpretrain.errors import UserError

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

# Names under which the GPT-2 124M config is known; it is built in, so no download is needed.
_BUILTIN_NAMES = ("gpt2", "openai-community/gpt2")


def config_from(source: Any = None, **overrides) -> GPT2Config:
    """A GPT2Config from a GPT2Config, a dict, a directory or config.json path, or None / "gpt2".

    `overrides` set config fields (None values are ignored, so unset CLI options pass through);
    `dropout` sets embd_pdrop, attn_pdrop and resid_pdrop together.
    """
    if source is None or (isinstance(source, str) and source in _BUILTIN_NAMES and not os.path.exists(source)):
        config = GPT2Config()  # its defaults are GPT-2 124M
    elif isinstance(source, GPT2Config):
        config = GPT2Config.from_dict(source.to_dict())
    elif isinstance(source, dict):
        config = GPT2Config.from_dict(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such config file (expected an HF directory or config.json)")
        try:
            with open(path) as f:
                config = GPT2Config.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a GPT-2 config.json ({e})") from None
    else:
        raise UserError(f"model config: cannot read a GPT-2 config from {type(source).__name__}")

    for name, value in overrides.items():
        if value is None:
            continue
        if name == "dropout":
            config.embd_pdrop = config.attn_pdrop = config.resid_pdrop = float(value)
        elif hasattr(config, name):
            setattr(config, name, value)
        else:
            raise UserError(f"model.{name}: not a GPT-2 config field")
    _validate(config)
    return config


def _validate(config: GPT2Config) -> None:
    for name in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise UserError(f"model.{name}: must be a positive integer, got {getattr(config, name)!r}")
    if config.n_embd % config.n_head:
        raise UserError(f"model.n_head: n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    if config.activation_function not in ACTIVATIONS:
        raise UserError(
            f"model.activation_function: {config.activation_function!r} is not one of {sorted(ACTIVATIONS)}"
        )
    if not getattr(config, "tie_word_embeddings", True):
        raise UserError("model.tie_word_embeddings: only tied input/output embeddings are supported")
    if getattr(config, "add_cross_attention", False):
        raise UserError("model.add_cross_attention: cross-attention is not supported")


# The activations of transformers' ACT2FN that GPT-2 configs use.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "tanh": jnp.tanh,
}


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    # eager_sharding=False: modules are built without a mesh; create_model shards them in jit.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(jnp.ones((dim,), param_dtype), ("embed",))
        self.bias = _param(jnp.zeros((dim,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype, as torch autocast does.
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Dense(nnx.Module):
    """HF's Conv1D: y = x @ kernel + bias with kernel [in, *out] (already HF's [in, out] layout)."""

    def __init__(self, d_in: int, out_shape: tuple[int, ...], axes, *, std: float, key, dtype, param_dtype):
        self.dtype = dtype
        self.kernel = _param(std * jax.random.normal(key, (d_in, *out_shape), param_dtype), axes)
        self.bias = _param(jnp.zeros(out_shape, param_dtype), axes[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=1)
        return y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, rows: int, real_rows: int, dim: int, axes, *, std: float, key, param_dtype):
        table = std * jax.random.normal(key, (rows, dim), param_dtype)
        # Padding rows (vocab_multiple) stay zero: no token looks them up and no logit reads them.
        self.embedding = _param(table.at[real_rows:].set(0), axes)


class Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl):
        d, std = config.n_embd, config.initializer_range
        self.n_head, self.head_dim = config.n_head, d // config.n_head
        self.dtype, self.attention_impl = dtype, attention_impl
        self.attn_pdrop, self.resid_pdrop = float(config.attn_pdrop), float(config.resid_pdrop)
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        # One fused matmul for q, k and v; [embed, 3, embed] so heads split without mixing q/k/v.
        self.c_attn = Dense(d, (3, d), ("embed", "qkv", "heads"), std=std, key=rngs.params(), **kw)
        # Residual projections get GPT-2's 1/sqrt(2 * n_layer) scaled init.
        proj_std = std / math.sqrt(2 * config.n_layer)
        self.c_proj = Dense(d, (d,), ("heads", "embed"), std=proj_std, key=rngs.params(), **kw)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, self.n_head, self.head_dim)
        q, k, v = (parallel.constrain(qkv[:, :, i], ("batch", "length", "act_heads", None)) for i in range(3))
        attn_key, resid_key = jax.random.split(key) if key is not None else (None, None)
        if attn_key is not None and self.attn_pdrop > 0:
            # Fused kernels take no dropout; spell attention out when training with attn_pdrop.
            y = self._attention_with_dropout(q, k, v, attn_key)
        else:
            impl = _resolve_attention_impl(self.attention_impl, self.dtype, self.head_dim)
            y = jax.nn.dot_product_attention(q, k, v, scale=self.scale, is_causal=True, implementation=impl)
        y = self.c_proj(y.reshape(b, t, d))
        return _dropout(y, self.resid_pdrop, resid_key)

    def _attention_with_dropout(self, q, k, v, key):
        t = q.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
        probs = _dropout(probs.astype(v.dtype), self.attn_pdrop, key)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _resolve_attention_impl(impl: str | None, dtype, head_dim: int) -> str:
    # cuDNN flash attention applies on GPU, in half precision, for head sizes it supports.
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    on_gpu = jax.default_backend() == "gpu"
    if impl == "cudnn" and not (on_gpu and half):
        raise UserError(
            f"model.attention_impl: 'cudnn' needs a GPU and dtype bfloat16/float16 "
            f"(backend {jax.default_backend()}, dtype {jnp.dtype(dtype).name}); use 'xla' or None"
        )
    if impl is not None:
        return impl
    return "cudnn" if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


class MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, std = config.n_embd, config.initializer_range
        inner = config.n_inner or 4 * d
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.c_fc = Dense(d, (inner,), ("embed", "mlp"), std=std, key=rngs.params(), **kw)
        proj_std = std / math.sqrt(2 * config.n_layer)  # GPT-2's scaled residual-projection init
        self.c_proj = Dense(inner, (d,), ("mlp", "embed"), std=proj_std, key=rngs.params(), **kw)
        self.act = ACTIVATIONS[config.activation_function]
        self.resid_pdrop = float(config.resid_pdrop)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        h = parallel.constrain(self.act(self.c_fc(x)), ("batch", "length", "act_mlp"))
        return _dropout(self.c_proj(h), self.resid_pdrop, key)


class Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl):
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps, dtype=dtype, param_dtype=param_dtype)
        self.attn = Attention(
            config, layer_idx, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
        )
        self.ln_2 = LayerNorm(config.n_embd, eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
        x = x + self.attn(self.ln_1(x), attn_key)
        x = x + self.mlp(self.ln_2(x), mlp_key)
        return parallel.constrain(x, ("batch", "length", "act_embed"))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with a tied LM head: `model(input_ids) -> float32 logits [B, T, vocab_size]`.

    dtype: compute dtype; param_dtype: parameter (master) dtype.
    attention_impl: jax.nn.dot_product_attention's implementation ("xla", "cudnn"), None = auto.
    vocab_multiple: pad the embedding rows to a multiple of this (1 = no padding).
    remat: recompute each block in the backward pass; True (save nothing) or the name of a
      `jax.checkpoint_policies` policy, e.g. "dots_with_no_batch_dims_saveable".
    """

    def __init__(
        self,
        config: GPT2Config,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str | None = None,
        vocab_multiple: int = 1,
        remat: bool | str = False,
    ):
        config = config_from(config)
        if attention_impl not in (None, "xla", "cudnn"):
            raise UserError(f"model.attention_impl: {attention_impl!r} is not one of 'xla', 'cudnn', None")
        if not isinstance(vocab_multiple, int) or vocab_multiple < 1:
            raise UserError(f"model.vocab_multiple: must be a positive integer, got {vocab_multiple!r}")
        if isinstance(remat, str) and not hasattr(jax.checkpoint_policies, remat):
            raise UserError(f"model.remat: {remat!r} is not a jax.checkpoint_policies policy")
        # The HF config is kept as JSON: a module's static attributes must be hashable.
        self.config_json = config.to_json_string(use_diff=False)
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = -(-config.vocab_size // vocab_multiple) * vocab_multiple
        self.n_positions = config.n_positions
        self.embd_pdrop = float(config.embd_pdrop)
        self.dtype, self.remat = dtype, remat
        self.has_dropout = any(float(p) > 0 for p in (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop))

        std = config.initializer_range
        d = config.n_embd
        self.wte = Embed(
            self.padded_vocab_size, config.vocab_size, d, ("vocab", "embed"),
            std=std, key=rngs.params(), param_dtype=param_dtype,
        )
        self.wpe = Embed(
            config.n_positions, config.n_positions, d, ("positions", "embed"),
            std=std, key=rngs.params(), param_dtype=param_dtype,
        )
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        self.h = nnx.List([Block(config, i, **kw) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(d, config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)

    @property
    def config(self) -> GPT2Config:
        return GPT2Config.from_dict(json.loads(self.config_json))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, vocab_size] (float32). Dropout runs when deterministic=False, drawing from
        `rngs` (an nnx.Rngs with a "dropout" stream, or a PRNG key)."""
        b, t = input_ids.shape
        if t > self.n_positions:
            raise UserError(f"model.n_positions: sequence length {t} exceeds n_positions {self.n_positions}")
        key = None
        if not deterministic and self.has_dropout:
            if rngs is None:
                raise ValueError("dropout (deterministic=False) needs rngs")
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
        keys = list(jax.random.split(key, len(self.h) + 1)) if key is not None else [None] * (len(self.h) + 1)

        wte = self.wte.embedding[...].astype(self.dtype)
        x = jnp.take(wte, input_ids, axis=0) + self.wpe.embedding[...][:t].astype(self.dtype)
        x = parallel.constrain(_dropout(x, self.embd_pdrop, keys[0]), ("batch", "length", "act_embed"))
        for block, block_key in zip(self.h, keys[1:]):
            x = _remat_block(block, x, block_key, self.remat) if self.remat else block(x, block_key)
        x = self.ln_f(x)
        # Tied head; float32 accumulation and output so the loss sees float32 logits.
        logits = jnp.einsum("btd,vd->btv", x, wte, preferred_element_type=jnp.float32)
        logits = parallel.constrain(logits, ("batch", "length", "act_vocab"))
        return logits[..., : self.vocab_size]


def _remat_block(block: Block, x: jax.Array, key: jax.Array | None, remat: bool | str) -> jax.Array:
    # Plain jax.checkpoint over the block's split state: pure, so it works however the model
    # reached the trace (argument of nnx.jit, closure of jax.jit, merged from a State).
    policy = getattr(jax.checkpoint_policies, remat) if isinstance(remat, str) else None
    graphdef, state = nnx.split(block)
    run = jax.checkpoint(lambda s, y, k: nnx.merge(graphdef, s)(y, k), policy=policy)
    return run(state, x, key)


# ------------------------------------------------------------------------------------------------
# Building sharded
# ------------------------------------------------------------------------------------------------


def abstract_model(config, **model_kw) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as shapes only (nothing allocated)."""
    config = config_from(config)
    return nnx.split(nnx.eval_shape(lambda: GPT2LMHeadModel(config, rngs=nnx.Rngs(0), **model_kw)))


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
    graphdef, abstract_state = abstract_model(config, **model_kw)
    init = jax.jit(
        lambda: nnx.state(GPT2LMHeadModel(config, rngs=nnx.Rngs(params=seed), **model_kw)),
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
) -> GPT2LMHeadModel:
    """A freshly initialised model whose parameters are born sharded over `mesh` by the rules.

    Shapes come first (eval_shape); then one jitted program creates the parameters directly in
    their shards (the seed's is_meta_device): no device ever holds the full model.
    """
    graphdef, init = sharded_init(
        config, mesh=mesh or default_mesh(), seed=seed, dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl, vocab_multiple=vocab_multiple, remat=remat,
    )
    return nnx.merge(graphdef, init())
