"""The Llama family in Flax NNX: transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM.

Pre-norm decoder blocks (RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP), a final
RMSNorm and a tied or separate LM head. The parameter tree mirrors HF's module names (embed_tokens,
layers.{i}.self_attn.q_proj, ..., norm, lm_head) so the name table stays one line per tensor.

Layouts differ from HF for sharding: projection kernels are stored [in, out] (jnp's matmul order),
q/k/v kernels as [embed, heads, head_dim] and o_proj as [heads, head_dim, embed], so tensor
parallelism splits whole heads, and a dimension the tensor axis does not divide (fewer kv heads than
tp) simply stays replicated. The embedding and LM head may carry zero vocabulary-padding rows.

Parameters are float32 masters; the forward pass runs in `dtype` (bfloat16 on GPU); RMSNorm
statistics, rotary embeddings and logits are float32.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import PretrainedConfig

from jaxpretrain import parallel
from jaxpretrain.errors import UserError
from jaxpretrain.model import layers
from jaxpretrain.model.llama import config as config_lib

# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.eps, self.dtype = float(eps), dtype
        self.weight = layers.param(jnp.ones((dim,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype, as HF's LlamaRMSNorm does.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias): kernel [*in_shape, *out_shape] contracts the input's last len(in_shape) dims."""

    def __init__(self, in_shape, out_shape, axes, *, bias: bool, std: float, key, dtype, param_dtype):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype, self.n_in = dtype, len(in_shape)
        # HF's _init_weights: normal(0, initializer_range) weights, zero biases.
        self.kernel = layers.param(std * jax.random.normal(key, in_shape + out_shape, param_dtype), axes)
        self.bias = layers.param(jnp.zeros(out_shape, param_dtype), axes[len(in_shape):]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes=self.n_in)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, rows: int, real_rows: int, dim: int, *, std: float, key, param_dtype, zero_row=None):
        table = std * jax.random.normal(key, (rows, dim), param_dtype)
        # Padding rows (vocab_multiple) stay zero: no token looks them up and no logit reads them.
        table = table.at[real_rows:].set(0)
        if zero_row is not None and 0 <= zero_row < real_rows:
            table = table.at[zero_row].set(0)  # nn.Embedding(padding_idx=pad_token_id), as HF inits it
        self.embedding = layers.param(table, ("vocab", "embed"))


def rotary_tables(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, head_dim] (float32) for integer positions [..., T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE on x [B, T, heads, head_dim], in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: PretrainedConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl):
        d, std, hd = config.hidden_size, config.initializer_range, config_lib.head_dim(config)
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.dtype, self.attention_impl = dtype, attention_impl
        self.dropout = float(config.attention_dropout or 0.0)
        self.scale = hd**-0.5
        self.inv_freq = tuple(float(f) for f in config_lib.rope_inv_freq(config))  # static, hashable
        bias = config_lib.biases(config)
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear((d,), (self.n_head, hd), ("embed", "heads", None), bias=bias["qkv"], key=rngs.params(), **kw)
        self.k_proj = Linear((d,), (self.n_kv_head, hd), ("embed", "kv_heads", None), bias=bias["qkv"], key=rngs.params(), **kw)
        self.v_proj = Linear((d,), (self.n_kv_head, hd), ("embed", "kv_heads", None), bias=bias["qkv"], key=rngs.params(), **kw)
        self.o_proj = Linear((self.n_head, hd), (d,), ("heads", None, "embed"), bias=bias["o"], key=rngs.params(), **kw)

    def _qkv(self, x, positions):
        cos, sin = rotary_tables(jnp.asarray(self.inv_freq, jnp.float32), positions)
        q = parallel.constrain(apply_rotary(self.q_proj(x), cos, sin), ("batch", "length", "act_heads", None))
        k = parallel.constrain(apply_rotary(self.k_proj(x), cos, sin), ("batch", "length", "act_kv_heads", None))
        v = parallel.constrain(self.v_proj(x), ("batch", "length", "act_kv_heads", None))
        return q, k, v

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
        # Grouped-query attention: query head n reads kv head n // (n_head // n_kv_head), as HF's repeat_kv.
        y = layers.attention(
            q, k, v, scale=self.scale, impl=self.attention_impl, dtype=self.dtype,
            dropout_rate=self.dropout, dropout_key=key,
        )
        return self.o_proj(parallel.constrain(y, ("batch", "length", "act_heads", None)))

    def decode(self, x, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
        """Attention of x's t new positions (start, ..., start + t - 1) over the cache, which gains their k, v."""
        q, k, v = self._qkv(x, start + jnp.arange(x.shape[1]))
        cache = layers.update_cache(cache, k, v, start)
        return self.o_proj(layers.cached_attention(q, cache["k"], cache["v"], start, scale=self.scale)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: PretrainedConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, inner = config.hidden_size, config.intermediate_size
        kw = dict(bias=config_lib.biases(config)["mlp"], std=config.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear((d,), (inner,), ("embed", "mlp"), key=rngs.params(), **kw)
        self.up_proj = Linear((d,), (inner,), ("embed", "mlp"), key=rngs.params(), **kw)
        self.down_proj = Linear((inner,), (d,), ("mlp", "embed"), key=rngs.params(), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(parallel.constrain(h, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):
    def __init__(self, config: PretrainedConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention_impl):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.self_attn = Attention(config, rngs=rngs, attention_impl=attention_impl, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.mlp = MLP(config, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), key)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return parallel.constrain(x, ("batch", "length", "act_embed"))

    def decode(self, x, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
        y, cache = self.self_attn.decode(self.input_layernorm(x), cache, start)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LMHead(nnx.Module):
    """The untied output projection, HF's lm_head.weight [vocab, hidden] (zero padding rows)."""

    def __init__(self, rows: int, real_rows: int, dim: int, *, std: float, key, param_dtype):
        table = std * jax.random.normal(key, (rows, dim), param_dtype)
        self.weight = layers.param(table.at[real_rows:].set(0), ("vocab", "embed"))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


class LlamaForCausalLM(nnx.Module):
    """A Llama-family causal LM: `model(input_ids) -> float32 logits [B, T, vocab_size]`.

    dtype: compute dtype; param_dtype: parameter (master) dtype.
    attention_impl: jax.nn.dot_product_attention's implementation ("xla", "cudnn"), None = auto.
    vocab_multiple: pad the embedding (and LM head) rows to a multiple of this (1 = no padding).
    remat: recompute each block in the backward pass; True (save nothing) or the name of a
      `jax.checkpoint_policies` policy, e.g. "dots_with_no_batch_dims_saveable".
    scan_layers: run the blocks as one `lax.scan` (layers.scan_blocks): XLA compiles one block, not
      num_hidden_layers; parameters, checkpoints and HF names stay per layer.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention_impl: str | None = None,
        vocab_multiple: int = 1,
        remat: bool | str = False,
        scan_layers: bool = False,
    ):
        config = config_lib.config_from(config)
        layers.check_attention_impl(attention_impl)
        layers.check_remat(remat)
        if scan_layers:
            layers.check_scan_dropout(
                config.attention_dropout, attention_impl, dtype, config_lib.head_dim(config)
            )
        # The HF config is kept as JSON: a module's static attributes must be hashable.
        self.config_json = config.to_json_string(use_diff=False)
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = layers.padded_size(config.vocab_size, vocab_multiple)
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        self.has_dropout = float(config.attention_dropout or 0.0) > 0
        self.dtype, self.remat, self.scan_layers = dtype, remat, bool(scan_layers)
        self.max_positions = config.max_position_embeddings  # the longest sequence generation allows
        # Mistral's window: config_from accepts only windows >= max_position_embeddings (full causal
        # attention up to there); a longer input would need the window that HF applies.
        self.sliding_window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.n_kv_head, self.head_dim = config.num_key_value_heads, config_lib.head_dim(config)

        std, d = config.initializer_range, config.hidden_size
        emb = dict(std=std, param_dtype=param_dtype, zero_row=config.pad_token_id)
        self.embed_tokens = Embed(self.padded_vocab_size, config.vocab_size, d, key=rngs.params(), **emb)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if not self.tie_word_embeddings:
            self.lm_head = LMHead(self.padded_vocab_size, config.vocab_size, d, std=std, key=rngs.params(), param_dtype=param_dtype)

    @property
    def config(self) -> PretrainedConfig:
        d = json.loads(self.config_json)
        return config_lib.CONFIG_CLASSES[d["model_type"]].from_dict(d)

    def head_weights(self) -> tuple[jax.Array, int]:
        """(W [padded_vocab, hidden] in the compute dtype, vocab_size): logits = hidden_states @ W.T."""
        w = self.embed_tokens.embedding if self.tie_word_embeddings else self.lm_head.weight
        return w[...].astype(self.dtype), self.vocab_size

    def hidden_states(
        self, input_ids: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None
    ) -> jax.Array:
        """[B, T, hidden] after the final norm, in the compute dtype."""
        if self.sliding_window is not None and input_ids.shape[-1] > self.sliding_window:
            raise UserError(
                f"model.sliding_window: a {input_ids.shape[-1]}-token input exceeds the {self.sliding_window}-token "
                "window, and sliding-window attention is not supported"
            )
        key = None
        if not deterministic and self.has_dropout:
            if rngs is None:
                raise ValueError("dropout (deterministic=False) needs rngs")
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
        keys = list(jax.random.split(key, len(self.layers))) if key is not None else [None] * len(self.layers)

        x = jnp.take(self.embed_tokens.embedding[...].astype(self.dtype), input_ids, axis=0)
        x = parallel.constrain(x, ("batch", "length", "act_embed"))
        if self.scan_layers:
            x = layers.scan_blocks(self.layers, x, keys, self.remat)
        else:
            for layer, layer_key in zip(self.layers, keys):
                x = layers.remat_block(layer, x, layer_key, self.remat) if self.remat else layer(x, layer_key)
        return self.norm(x)

    def __call__(
        self, input_ids: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, T, vocab_size] (float32). Attention dropout runs when deterministic=False and
        attention_dropout > 0, drawing from `rngs` (an nnx.Rngs with a "dropout" stream, or a PRNG key)."""
        x = self.hidden_states(input_ids, deterministic=deterministic, rngs=rngs)
        w, _ = self.head_weights()
        # float32 accumulation and output so the loss sees float32 logits.
        logits = jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)
        logits = parallel.constrain(logits, ("batch", "length", "act_vocab"))
        return logits[..., : self.vocab_size]

    # -- Generation with a KV cache (jaxpretrain.model.decode drives these two).

    def init_cache(self, batch: int, max_len: int) -> list[dict]:
        """Per layer, zero k and v caches [batch, max_len, kv_heads, head_dim] in the compute dtype."""
        shape = (batch, max_len, self.n_kv_head, self.head_dim)
        return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in self.layers]

    def decode_step(self, input_ids: jax.Array, cache: list[dict], start: jax.Array) -> tuple[jax.Array, list[dict]]:
        """Logits [B, t, vocab_size] (float32) of t new tokens at positions start.., and the cache holding them."""
        x = jnp.take(self.embed_tokens.embedding[...].astype(self.dtype), input_ids, axis=0)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.decode(x, layer_cache, start)
            new_cache.append(layer_cache)
        w, _ = self.head_weights()
        logits = jnp.einsum("btd,vd->btv", self.norm(x), w, preferred_element_type=jnp.float32)
        return logits[..., : self.vocab_size], new_cache
