"""GPT-2's Hugging Face config: reading it from any source, overrides, validation, FLOPs per token."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from transformers import GPT2Config

from jaxpretrain.errors import UserError
from jaxpretrain.model.registry import read_config_json

# Names under which the GPT-2 124M config is known; it is built in, so no download is needed.
BUILTIN_NAMES = ("gpt2", "openai-community/gpt2")

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


def config_from(source: Any = None, **overrides) -> GPT2Config:
    """A GPT2Config from a GPT2Config, a dict, a directory or config.json path, or None / "gpt2".

    `overrides` set config fields (None values are ignored, so unset CLI options pass through);
    `dropout` sets embd_pdrop, attn_pdrop and resid_pdrop together.
    """
    if source is None or (isinstance(source, str) and source in BUILTIN_NAMES and not os.path.exists(source)):
        config = GPT2Config()  # its defaults are GPT-2 124M
    elif isinstance(source, GPT2Config):
        config = GPT2Config.from_dict(source.to_dict())
    elif isinstance(source, dict):
        config = GPT2Config.from_dict(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        data = read_config_json(source)
        try:
            config = GPT2Config.from_dict(data)
        except (TypeError, ValueError) as e:
            raise UserError(f"{os.fspath(source)}: not a GPT-2 config.json ({e})") from None
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
    validate(config)
    return config


def validate(config: GPT2Config) -> None:
    for name in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise UserError(f"model.{name}: must be a positive integer, got {getattr(config, name)!r}")
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        rate = getattr(config, name, 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise UserError(f"model.dropout: {name} must be in [0, 1), got {rate!r}")
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


def param_count(config: GPT2Config) -> int:
    """Parameters as Hugging Face counts them (tied head once)."""
    d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    return config.vocab_size * d + config.n_positions * d + config.n_layer * block + 2 * d


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """nanoGPT's estimate: 6N (N without the position table) + 12 L H Q T for attention."""
    n = param_count(config) - config.n_positions * config.n_embd
    return 6.0 * n + 12.0 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * seq_len


def dropout_active(config: GPT2Config) -> bool:
    return any(float(getattr(config, k, 0.0)) > 0 for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop"))
