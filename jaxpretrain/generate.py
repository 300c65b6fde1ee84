"""`python -m jaxpretrain.generate --model HF_DIR --prompt TEXT`: sample a continuation from a GPT-2.

A small sampler for looking at what a run learned (the quick start ends with it); it recomputes the
whole fixed-length window each token, which is simple and fast enough for small models.
"""

from __future__ import annotations

import argparse

from jaxpretrain.errors import run_cli


def generate(model_dir: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxpretrain.model as M
    from jaxpretrain.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = M.from_pretrained(model_dir, dtype=jnp.float32)
    ids = tok(prompt).input_ids or [tok.eos_token_id]
    n_ctx = M.family_of(model.config).max_positions(model.config)
    window = min(n_ctx, len(ids) + max_new_tokens)

    @jax.jit
    def next_token(buf, pos, key):
        logits = model(buf[None])[0, pos - 1] / max(temperature, 1e-6)
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    key = jax.random.key(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        ctx = out[-window:]
        buf = np.zeros(window, np.int32)
        buf[: len(ctx)] = ctx
        key, sub = jax.random.split(key)
        out.append(int(next_token(jnp.asarray(buf), len(ctx), sub)))
    return tok.decode(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face GPT-2 directory (e.g. from jaxpretrain.export)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(generate(a.model, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, seed=a.seed))
    return 0


if __name__ == "__main__":
    run_cli(main)
