"""Sampling with a KV cache, for every family: prompt prefill, then one jitted decode loop.

A family's model provides `init_cache(batch, max_len)` (a pytree of fixed-size per-layer k/v
buffers, [batch, max_len, kv_heads, head_dim]) and `decode_step(ids [B, t], cache, start) -> (float32
logits [B, t, vocab], cache)` for positions start .. start + t - 1, and `max_positions`. The prompt
goes through `decode_step` once (prefill); each new token is then one `decode_step` of length 1
inside a `jax.lax.while_loop`, so the whole generation is one XLA program with no host round trip.

Sampling follows transformers' `generate`: temperature, then top-k (0 = off), then top-p (1.0 =
off), then a draw; temperature 0 is greedy (`do_sample=False`). Rows that emit `eos_token_id` are
finished: their later tokens are `pad_token_id` (eos when there is none), and the loop ends when
every row has finished. Draw i uses `fold_in(key(seed), i)`, so a seed reproduces its samples.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpretrain.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick each new token (transformers' names and defaults where they exist)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1.0: off
    seed: int = 0
    eos_token_id: int | None = None  # a row that emits it is finished
    pad_token_id: int | None = None  # what finished rows emit; None: eos_token_id

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens: must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k: must be a non-negative integer (0 is off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p: must be in (0, 1] (1 is off), got {self.top_p}")


def filter_logits(logits: jax.Array, temperature, top_k: int, top_p, use_top_p: bool = True) -> jax.Array:
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order:
    removed tokens get -inf. logits [..., vocab] float32; top_k and use_top_p (False skips the sort
    that top-p needs: top_p = 1 drops nothing) are static."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not use_top_p:
        return logits
    # Top-p as HF does it: in ascending order, drop tokens whose cumulative probability is at most
    # 1 - top_p; the most likely token always stays. With top_p = 1 nothing is dropped.
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = (cumulative <= 1 - top_p).at[..., -1].set(False)
    threshold = jnp.min(jnp.where(drop, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _pick(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_k, top_p, use_top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy", "top_k", "use_top_p", "has_eos"))
def _generate(state, prompt, seed, temperature, top_p, eos, pad, *, graphdef, max_new: int, greedy: bool,
              top_k: int, use_top_p: bool, has_eos: bool):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    key = jax.random.key(seed)
    pick = partial(_pick, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    # Prefill: the whole prompt in one pass fills the cache and gives the first new token.
    cache = model.init_cache(batch, prompt_len + max_new)
    logits, cache = model.decode_step(prompt, cache, jnp.int32(0))
    first = pick(logits[:, -1], jax.random.fold_in(key, 0))
    tokens = jnp.zeros((batch, prompt_len + max_new), jnp.int32).at[:, :prompt_len].set(prompt)
    tokens = tokens.at[:, prompt_len].set(first)
    done = jnp.logical_and(has_eos, first == eos)

    def more(carry):
        i, _, _, done = carry
        return (i < max_new) & ~jnp.all(done)

    def step(carry):
        i, tokens, cache, done = carry
        pos = prompt_len + i - 1  # the last token written; it goes through the model now
        last = jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1)
        logits, cache = model.decode_step(last, cache, pos)
        new = jnp.where(done, pad, pick(logits[:, 0], jax.random.fold_in(key, i)))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], pos + 1, axis=1)
        return i + 1, tokens, cache, done | jnp.logical_and(has_eos, new == eos)

    n, tokens, _, _ = jax.lax.while_loop(more, step, (jnp.int32(1), tokens, cache, done))
    return tokens, n


class Generator:
    """Generation for one model, batch size, prompt length and Sampling, jitted once.

    `generator(prompt int32 [batch, prompt_len]) -> (tokens [batch, prompt_len + max_new_tokens], n_new)`:
    only the first prompt_len + n_new columns are meaningful. `lower(prompt).compile()` compiles
    ahead of time; the compiled program takes `args(prompt)`.
    """

    def __init__(self, model, batch: int, prompt_len: int, sampling: Sampling):
        sampling.check()
        total = prompt_len + sampling.max_new_tokens
        if total > model.max_positions:
            raise UserError(
                f"max_new_tokens: prompt ({prompt_len}) + max_new_tokens ({sampling.max_new_tokens}) = {total} "
                f"exceeds the model's {model.max_positions} positions"
            )
        self.shape = (batch, prompt_len)
        graphdef, self._state = nnx.split(model)
        # One jitted function for the module: generators with the same statics and shapes share its cache.
        self._static = dict(graphdef=graphdef, max_new=sampling.max_new_tokens, greedy=sampling.temperature == 0,
                            top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0,
                            has_eos=sampling.eos_token_id is not None)
        eos = -1 if sampling.eos_token_id is None else int(sampling.eos_token_id)
        pad = eos if sampling.pad_token_id is None else int(sampling.pad_token_id)
        self._scalars = (jnp.uint32(sampling.seed), jnp.float32(sampling.temperature or 1.0),
                         jnp.float32(sampling.top_p), jnp.int32(eos), jnp.int32(max(pad, 0)))

    def args(self, prompt) -> tuple:
        prompt = jnp.asarray(prompt, jnp.int32)
        if prompt.shape != self.shape:
            raise ValueError(f"prompt shape {prompt.shape}, this generator was built for {self.shape}")
        return (self._state, prompt, *self._scalars)

    def __call__(self, prompt):
        return _generate(*self.args(prompt), **self._static)

    def lower(self, prompt):
        return _generate.lower(*self.args(prompt), **self._static)


def generate(model, prompt_ids, sampling: Sampling) -> np.ndarray:
    """Prompt + new tokens, int32 [batch, prompt_len + n_new] (every row has the same prompt length)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError(f"prompt: expected token ids [batch, length >= 1], got shape {prompt.shape}")
    tokens, n = Generator(model, *prompt.shape, sampling)(prompt)
    return np.asarray(tokens)[:, : prompt.shape[1] + int(n)]
