"""Generation speed: the KV cache (jaxpretrain.model.decode) against recomputing the whole prefix.

    python scripts/bench_generate.py [--prompt-len 16] [--new-tokens 240] [--batch 1] [--dtype float32]

For each model (random weights; the tiny presets' shapes and a 6-layer one, GPT-2 and Llama, vocabulary
50257), greedy decoding two ways, each one jitted program: the cache (prefill once, then one token
per step over [batch, max_len, kv_heads, head_dim] caches) and the old way (every step runs the model
over the whole fixed window, prompt + new tokens, and reads the logits at the last filled position).
Both must give the same tokens. Prints tokens/s (best of --repeats, after compilation) per model.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's jaxpretrain

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import GPT2Config, LlamaConfig

import jaxpretrain.model as M
from jaxpretrain.model.decode import Generator, Sampling

MODELS = {
    "gpt2 2x128 (gpt2.py:tiny)": GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=256),
    "llama 2x128 (llama.py:tiny)": LlamaConfig(
        vocab_size=50257, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "gpt2 6x384": GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=256),
    "llama 6x384": LlamaConfig(
        vocab_size=50257, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
}


@partial(jax.jit, static_argnames=("graphdef", "new_tokens"))
def recompute_greedy(state, prompt, *, graphdef, new_tokens: int):
    """Greedy decoding without a cache: each step runs the model over the whole window."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    window = jnp.zeros((batch, prompt_len + new_tokens), jnp.int32).at[:, :prompt_len].set(prompt)

    def step(i, window):
        logits = model(window)
        pos = prompt_len + i
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(window, nxt[:, None].astype(jnp.int32), pos, axis=1)

    return jax.lax.fori_loop(0, new_tokens, step, window)


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=240)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"device {jax.devices()[0].device_kind} | host {cpu}, {os.cpu_count()} cores | load {os.getloadavg()[0]:.1f} "
          f"| batch {a.batch} | prompt {a.prompt_len} | new {a.new_tokens} | {a.dtype}")
    prompt = np.random.RandomState(0).randint(0, 50257, (a.batch, a.prompt_len)).astype(np.int32)
    n = a.batch * a.new_tokens
    for name, config in MODELS.items():
        model = M.create_model(config, seed=0, dtype=jnp.dtype(a.dtype))
        generator = Generator(model, a.batch, a.prompt_len, Sampling(max_new_tokens=a.new_tokens, temperature=0.0))
        graphdef, state = nnx.split(model)
        cached = np.asarray(generator(prompt)[0])
        recomputed = np.asarray(recompute_greedy(state, prompt, graphdef=graphdef, new_tokens=a.new_tokens))
        same = np.array_equal(cached, recomputed)
        t_cache = best_time(lambda: generator(prompt), a.repeats)
        t_full = best_time(lambda: recompute_greedy(state, prompt, graphdef=graphdef, new_tokens=a.new_tokens), a.repeats)
        print(f"{name:28s} | KV cache {n / t_cache:9.1f} tokens/s | recompute {n / t_full:9.1f} tokens/s | "
              f"x{t_full / t_cache:.1f} | same tokens: {same}")


if __name__ == "__main__":
    main()
