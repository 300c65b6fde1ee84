"""GPT-2 in Flax NNX: Hugging Face's `GPT2LMHeadModel`, parameter for parameter.

The parameter tree mirrors HF's module names (wte, wpe, h.{i}.ln_1/attn/ln_2/mlp, ln_f) so the
name table in `weights.py` stays one line per tensor. Two layouts differ from HF, both for speed:
`c_attn` keeps its fused [embed, 3*embed] matmul but stores the kernel as [embed, 3, embed] so
tensor parallelism can split heads without splitting q from k and v; and `wte` may carry extra
zero rows (vocab_multiple) so the logits matmul has friendly sizes. Neither ever shows outside.

Every parameter names its axes (logical names such as ("vocab", "embed"));
`jaxpretrain.parallel.LOGICAL_AXIS_RULES` turns them into mesh shardings. Parameters are float32
masters; the forward pass runs in `dtype` (bfloat16 on GPU) and returns float32 logits.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import GPT2Config

from jaxpretrain import parallel
from jaxpretrain.errors import UserError
from jaxpretrain.model import layers
from jaxpretrain.model.gpt2.config import ACTIVATIONS, config_from

_param = layers.param
_dropout = layers.dropout

# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


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
        self.layer_idx = layer_idx  # also the static seed of cuDNN's attention dropout (layers.attention)
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
        y = layers.attention(
            q, k, v, scale=self.scale, impl=self.attention_impl, dtype=self.dtype,
            dropout_rate=self.attn_pdrop, dropout_key=attn_key, dropout_seed=self.layer_idx,
        )
        y = self.c_proj(y.reshape(b, t, d))
        return _dropout(y, self.resid_pdrop, resid_key)

    def _attention_with_dropout(self, q, k, v, key):
        return layers.attention_with_dropout(q, k, v, scale=self.scale, rate=self.attn_pdrop, key=key)

    def decode(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
        """Generation: x's t new positions attend over the KV cache, which gains their k, v."""
        b, t, d = x.shape
        q, k, v = (self.c_attn(x).reshape(b, t, 3, self.n_head, self.head_dim)[:, :, i] for i in range(3))
        cache = layers.update_cache(cache, k, v, start)
        y = layers.cached_attention(q, cache["k"], cache["v"], start, scale=self.scale)
        return self.c_proj(y.reshape(b, t, d)), cache


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

    def decode(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
        y, cache = self.attn.decode(self.ln_1(x), cache, start)
        x = x + y
        return x + self.mlp(self.ln_2(x), None), cache


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _check_scannable(config: GPT2Config, attention_impl, dtype) -> None:
    """A layer scan runs one block's code for every layer: the blocks must not differ but in weights."""
    if config.scale_attn_by_inverse_layer_idx:
        raise UserError("model.scan_layers: scale_attn_by_inverse_layer_idx gives each layer its own code; use scan_layers=False")
    layers.check_scan_dropout(config.attn_pdrop, attention_impl, dtype, config.n_embd // config.n_head)



class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with a tied LM head: `model(input_ids) -> float32 logits [B, T, vocab_size]`.

    dtype: compute dtype; param_dtype: parameter (master) dtype.
    attention_impl: jax.nn.dot_product_attention's implementation ("xla", "cudnn"), None = auto.
    vocab_multiple: pad the embedding rows to a multiple of this (1 = no padding).
    remat: recompute each block in the backward pass; True (save nothing) or the name of a
      `jax.checkpoint_policies` policy, e.g. "dots_with_no_batch_dims_saveable".
    scan_layers: run the blocks as one `lax.scan` (layers.scan_blocks): XLA compiles one block, not
      n_layer; parameters, checkpoints and HF weights are unchanged.
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
        scan_layers: bool = False,
    ):
        config = config_from(config)
        layers.check_attention_impl(attention_impl)
        layers.check_remat(remat)
        if scan_layers:
            _check_scannable(config, attention_impl, dtype)
        # The HF config is kept as JSON: a module's static attributes must be hashable.
        self.config_json = config.to_json_string(use_diff=False)
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = layers.padded_size(config.vocab_size, vocab_multiple)
        self.n_positions = config.n_positions
        self.max_positions = config.n_positions  # the longest sequence generation allows
        self.embd_pdrop = float(config.embd_pdrop)
        self.dtype, self.remat, self.scan_layers = dtype, remat, bool(scan_layers)
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

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """The final LayerNorm's output [B, T, n_embd] in the compute dtype. Dropout runs when
        deterministic=False, drawing from `rngs` (an nnx.Rngs with a "dropout" stream, or a PRNG key)."""
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
        if self.scan_layers:
            x = layers.scan_blocks(self.h, x, keys[1:], self.remat)
        else:
            for block, block_key in zip(self.h, keys[1:]):
                x = layers.remat_block(block, x, block_key, self.remat) if self.remat else block(x, block_key)
        return self.ln_f(x)

    def head_weights(self) -> tuple[jax.Array, int]:
        """The output embedding [padded_vocab_size, n_embd] in the compute dtype (tied: wte), and how
        many of its rows are real tokens."""
        return self.wte.embedding[...].astype(self.dtype), self.vocab_size

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, vocab_size] (float32); see `hidden_states` for dropout."""
        x = self.hidden_states(input_ids, deterministic=deterministic, rngs=rngs)
        wte, vocab_size = self.head_weights()
        # Tied head; float32 accumulation and output so the loss sees float32 logits.
        logits = jnp.einsum("btd,vd->btv", x, wte, preferred_element_type=jnp.float32)
        logits = parallel.constrain(logits, ("batch", "length", "act_vocab"))
        return logits[..., :vocab_size]

    # -- Generation with a KV cache (jaxpretrain.model.decode drives these two).

    def init_cache(self, batch: int, max_len: int) -> list[dict]:
        """Per block, zero k and v caches [batch, max_len, n_head, head_dim] in the compute dtype."""
        shape = (batch, max_len, self.h[0].attn.n_head, self.h[0].attn.head_dim)
        return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in self.h]

    def decode_step(self, input_ids: jax.Array, cache: list[dict], start: jax.Array) -> tuple[jax.Array, list[dict]]:
        """Logits [B, t, vocab_size] (float32) of t new tokens at positions start.., and the updated cache."""
        wte = self.wte.embedding[...].astype(self.dtype)
        positions = jax.lax.dynamic_slice_in_dim(self.wpe.embedding[...], start, input_ids.shape[1], axis=0)
        x = jnp.take(wte, input_ids, axis=0) + positions.astype(self.dtype)
        new_cache = []
        for block, block_cache in zip(self.h, cache):
            x, block_cache = block.decode(x, block_cache, start)
            new_cache.append(block_cache)
        logits = jnp.einsum("btd,vd->btv", self.ln_f(x), wte, preferred_element_type=jnp.float32)
        return logits[..., : self.vocab_size], new_cache
