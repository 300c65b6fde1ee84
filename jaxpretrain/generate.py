"""`python -m jaxpretrain.generate (--model HF_DIR | --checkpoint-dir DIR) --prompt TEXT`: sample text.

Any family, from a Hugging Face directory or a training checkpoint. The prompt is prefilled once into a
KV cache, then one jitted decode loop adds a token per step (jaxpretrain/model/decode.py); the last
line reports tokens/s. Sampling as transformers' `generate`: --temperature (0: greedy), --top-k (0:
off), --top-p (1: off), --seed; a row stops at the tokenizer's eos token.
"""

from __future__ import annotations

import argparse
import os
import time

from jaxpretrain.errors import UserError, run_cli


def load_model_and_tokenizer(model_dir: str | None, checkpoint_dir: str | None, step: int | None, dtype: str):
    """(model, tokenizer) from an HF directory or a training checkpoint (its dataset's tokenizer)."""
    import jax.numpy as jnp
    from flax import nnx

    import jaxpretrain.model as M
    from jaxpretrain.tokenizer import load_tokenizer

    if model_dir is not None:
        return M.from_pretrained(model_dir, dtype=jnp.dtype(dtype)), load_tokenizer(model_dir)
    from jaxpretrain.export import load_checkpoint_model

    model, meta = load_checkpoint_model(checkpoint_dir, step)
    if jnp.dtype(dtype) != jnp.float32:  # the compute dtype is a static attribute: a graph built with it
        vocab_multiple = int(meta["config"]["model"]["vocab_multiple"])
        graphdef, _ = M.abstract_model(model.config, dtype=jnp.dtype(dtype), vocab_multiple=vocab_multiple)
        model = nnx.merge(graphdef, nnx.state(model))
    return model, load_tokenizer(meta.get("tokenizer") or "gpt2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxpretrain.generate", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory (e.g. from jaxpretrain.export)")
    source.add_argument("--checkpoint-dir", help="checkpoint.checkpoint_dir of a training run")
    p.add_argument("--step", type=int, default=None, help="with --checkpoint-dir: the step to load (default: newest)")
    p.add_argument("--prompt", default="def ", help='text to continue (default: "def ")')
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add to each sample at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed, the same samples (default: 0)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, decoded as one batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    a = p.parse_args(argv)
    check_args(a)  # before jax is imported: a bad flag answers at once
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only notices are not news to the user

    import numpy as np

    from jaxpretrain.model.decode import Generator, Sampling

    model, tok = load_model_and_tokenizer(a.model, a.checkpoint_dir, a.step, a.dtype)
    ids = tok(a.prompt).input_ids or [tok.eos_token_id]
    sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        seed=a.seed, eos_token_id=tok.eos_token_id)
    prompt = np.tile(np.asarray(ids, np.int32), (a.num_samples, 1))
    generator = Generator(model, *prompt.shape, sampling)
    t0 = time.perf_counter()
    compiled = generator.lower(prompt).compile()
    t1 = time.perf_counter()
    tokens, n_new = compiled(*generator.args(prompt))
    tokens, n_new = np.asarray(tokens), int(n_new)  # waits for the device
    t2 = time.perf_counter()
    for row in tokens[:, : len(ids) + n_new]:
        print(tok.decode(row.tolist()))
        print("-" * 40) if a.num_samples > 1 else None
    print(
        f"generated {a.num_samples} x {n_new} tokens after a {len(ids)}-token prompt in {t2 - t1:.3f} s: "
        f"{a.num_samples * n_new / (t2 - t1):.1f} tokens/s (compiled in {t1 - t0:.1f} s)"
    )
    return 0


def check_args(a) -> None:
    """The flags' ranges (jaxpretrain.model.decode.Sampling checks them again for library callers) and
    the source directory, as one line naming the flag."""
    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be a positive integer, got {a.max_new_tokens}")
    if not (a.temperature >= 0 and a.temperature != float("inf")):
        raise UserError(f"--temperature: must be >= 0 (0 is greedy), got {a.temperature}")
    if a.top_k < 0:
        raise UserError(f"--top-k: must be >= 0 (0 is off), got {a.top_k}")
    if not 0.0 < a.top_p <= 1.0:
        raise UserError(f"--top-p: must be in (0, 1] (1 is off), got {a.top_p}")
    if a.num_samples < 1:
        raise UserError(f"--num-samples: must be a positive integer, got {a.num_samples}")
    if a.step is not None and a.model is not None:  # an HF directory holds one set of weights, no steps
        raise UserError(f"--step: applies to --checkpoint-dir only, not to --model {a.model}")
    if a.model is not None:
        if not os.path.isdir(a.model):
            raise UserError(f"--model: {a.model}: no such directory")
        if not os.path.isfile(os.path.join(a.model, "config.json")):
            if any(name.isdigit() for name in os.listdir(a.model)):
                raise UserError(f"--model: {a.model} is a training checkpoint directory; pass it as --checkpoint-dir")
            raise UserError(f"--model: {a.model} has no config.json (expected a Hugging Face model directory)")
    elif not os.path.isdir(a.checkpoint_dir):
        raise UserError(f"--checkpoint-dir: {a.checkpoint_dir}: no such directory")


if __name__ == "__main__":
    run_cli(main)
