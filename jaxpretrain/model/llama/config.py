"""The Llama family's configs: Hugging Face's LlamaConfig, Qwen2Config and MistralConfig, validated.

One module serves the three: their differences are config (Qwen2 puts biases on q/k/v only, Llama
has `attention_bias` and `mlp_bias`, Mistral neither). Anything the model does not implement (a
sliding window, RoPE types other than default/linear/llama3, per-layer RoPE, another activation) is
one UserError line naming the field, before any weights are touched.

RoPE parameters come in two generations of config.json: transformers 5 writes `rope_parameters`
(with `rope_theta` and `rope_type` inside), older files `rope_theta` plus `rope_scaling`. The
installed transformers' config classes read both and write `rope_parameters`; this module reads
only the normalised `config.rope_parameters`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from jaxpretrain.errors import UserError
from jaxpretrain.model.registry import read_config_json

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
# Names that need no download: transformers' defaults for each config class (the presets in
# configs/llama.py start from "llama" and write every shape field in).
BUILTIN_NAMES = tuple(CONFIG_CLASSES)
ACTIVATIONS = ("silu", "swish")  # both are SiLU in transformers' ACT2FN; SwiGLU's gate


def config_from(source: Any = None, **overrides) -> PretrainedConfig:
    """A validated LlamaConfig / Qwen2Config / MistralConfig (chosen by `model_type`, default llama).

    `source`: None or a built-in name ("llama", "qwen2", "mistral": transformers' defaults for that
    class), a config object, a dict, an HF directory or its config.json. `overrides` set config
    fields (None values are ignored, so unset CLI options pass through); `rope_theta` sets
    rope_parameters["rope_theta"]; `dropout` sets attention_dropout (the family's only dropout).
    Overriding hidden_size or num_attention_heads re-derives a head_dim that was derived.
    """
    d = _source_dict(source)
    model_type = d.get("model_type") or "llama"
    if model_type not in CONFIG_CLASSES:
        raise UserError(f"model_type: {model_type!r} is not one of the llama family's {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[model_type]
    fields = set(cls.__dataclass_fields__)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _normalise_rope(d)

    if {"hidden_size", "num_attention_heads"} & set(overrides) and "head_dim" not in overrides and "head_dim" in d:
        old_h, old_n = d.get("hidden_size"), d.get("num_attention_heads")
        if d["head_dim"] is None or (old_h and old_n and d["head_dim"] == old_h // old_n):
            d["head_dim"] = None  # it was derived: derive it again from the new shape
    if "num_hidden_layers" in overrides and d.get("layer_types") and all(t == "full_attention" for t in d["layer_types"]):
        d["layer_types"] = None  # Qwen2 lists one entry per layer; rebuilt for the new depth
    # rope_theta last: it edits whatever rope_parameters the source or an override gave.
    for name, value in sorted(overrides.items(), key=lambda kv: kv[0] == "rope_theta"):
        if hasattr(value, "to_dict"):  # an ml_collections ConfigDict (rope_parameters from a config file)
            value = value.to_dict()
        if name == "dropout":
            d["attention_dropout"] = float(value)
        elif name == "rope_theta":
            d["rope_parameters"] = {**(d.get("rope_parameters") or {"rope_type": "default"}), "rope_theta": float(value)}
        elif name in fields:
            d[name] = value
        else:
            raise UserError(f"model.{name}: not a {cls.__name__} field")
    try:
        config = cls.from_dict(d)
    except (StrictDataclassError, ValueError, TypeError) as e:
        raise UserError(f"model config: {_one_line(e)}") from None
    validate(config)
    return config


def _source_dict(source: Any) -> dict:
    if source is None:
        return LlamaConfig().to_dict()
    if isinstance(source, str) and source in BUILTIN_NAMES and not os.path.exists(source):
        # The class's own defaults (Mistral's without its 4096-token sliding window).
        return CONFIG_CLASSES[source]().to_dict() | ({"sliding_window": None} if source == "mistral" else {})
    if isinstance(source, PretrainedConfig):
        return source.to_dict()
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        return read_config_json(source)
    raise UserError(f"model config: cannot read a Llama config from {type(source).__name__}")


def _normalise_rope(d: dict) -> None:
    """`rope_theta`, `rope_scaling` and `rope_parameters`, in whatever mix a config.json has them, as one
    transformers-5 `rope_parameters` dict, with transformers' precedence (its
    `convert_rope_params_to_dict`): an old-style `rope_scaling` wins over `rope_parameters`; a
    `rope_theta` inside the dict wins over a top-level one, which wins over the default; an explicit
    `rope_type` wins over the older `type`."""
    theta, scaling = d.pop("rope_theta", None), d.pop("rope_scaling", None)
    rope = dict(scaling or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        d["rope_parameters"] = rope  # per-layer-type parameters: validate() rejects them
        return
    kind = rope.pop("type", None)
    rope["rope_type"] = rope.get("rope_type") or kind or "default"
    if theta is not None:
        rope.setdefault("rope_theta", theta)
    d["rope_parameters"] = rope


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def validate(config: PretrainedConfig) -> None:
    """One UserError line for the first field the model cannot honour."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
        value = head_dim(config) if name == "head_dim" else getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"model.{name}: must be a positive integer, got {value!r}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise UserError(
            f"model.num_key_value_heads: {config.num_key_value_heads} does not divide "
            f"num_attention_heads {config.num_attention_heads}"
        )
    if head_dim(config) % 2:
        raise UserError(f"model.head_dim: rotary embeddings need an even head_dim, got {head_dim(config)}")
    if config.hidden_act not in ACTIVATIONS:
        raise UserError(f"model.hidden_act: {config.hidden_act!r} is not supported (SwiGLU MLP: 'silu')")
    if not (isinstance(config.rms_norm_eps, (int, float)) and config.rms_norm_eps > 0):
        raise UserError(f"model.rms_norm_eps: must be positive, got {config.rms_norm_eps!r}")
    if not 0.0 <= float(config.attention_dropout or 0.0) < 1.0:
        raise UserError(f"model.attention_dropout: must be in [0, 1), got {config.attention_dropout!r}")
    if getattr(config, "use_sliding_window", False):
        raise UserError("model.use_sliding_window: sliding-window attention is not supported (set it to false)")
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window is not None and window < config.max_position_embeddings:
        # A window at least as long as every sequence is full causal attention; shorter ones are not.
        raise UserError(
            f"model.sliding_window: {window} (sliding-window attention) is not supported; set it to null"
        )
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        raise UserError(f"model.layer_types: only 'full_attention' layers are supported, got {sorted(layer_types)}")
    rope = config.rope_parameters or {}
    if "rope_type" not in rope:
        raise UserError(f"model.rope_parameters: per-layer RoPE parameters are not supported ({sorted(rope)})")
    if rope["rope_type"] not in ROPE_TYPES:
        raise UserError(f"model.rope_parameters.rope_type: {rope['rope_type']!r} is not one of {list(ROPE_TYPES)}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("model.rope_parameters.partial_rotary_factor: only 1.0 (rotate the whole head) is supported")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}.get(rope["rope_type"], ())
    for key in ("rope_theta",) + needed:
        if not isinstance(rope.get(key), (int, float)) or rope[key] <= 0:
            raise UserError(f"model.rope_parameters.{key}: must be a positive number, got {rope.get(key)!r}")
    if rope["rope_type"] == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise UserError("model.rope_parameters.high_freq_factor: must exceed low_freq_factor")
    if getattr(config, "quantization_config", None):
        raise UserError("model.quantization_config: quantized checkpoints are not supported")


# ------------------------------------------------------------------------------------------------
# What the model reads from the config
# ------------------------------------------------------------------------------------------------


def head_dim(config: PretrainedConfig) -> int:
    """The config's head_dim, else hidden_size // num_attention_heads (Qwen2Config has no such field)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def biases(config: PretrainedConfig) -> dict[str, bool]:
    """Which projections carry a bias: Qwen2 q/k/v only; Llama `attention_bias` (q/k/v/o) and `mlp_bias`;
    Mistral none."""
    if config.model_type == "qwen2":
        return {"qkv": True, "o": False, "mlp": False}
    if config.model_type == "mistral":  # transformers' Mistral has no biases, whatever attention_bias says
        return {"qkv": False, "o": False, "mlp": False}
    attn = bool(getattr(config, "attention_bias", False))
    return {"qkv": attn, "o": attn, "mlp": bool(getattr(config, "mlp_bias", False))}


def rope_inv_freq(config: PretrainedConfig) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    rope = config.rope_parameters
    dim = head_dim(config)
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind = rope["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        # A top-level original_max_position_embeddings wins over the dict's, as in transformers' RoPE init.
        old_len = float(getattr(config, "original_max_position_embeddings", None) or rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq.astype(np.float32)


def architecture(config: PretrainedConfig) -> str:
    return ARCHITECTURES[config.model_type]


# ------------------------------------------------------------------------------------------------
# HF names and costs
# ------------------------------------------------------------------------------------------------


def name_table(config: PretrainedConfig) -> list[tuple[str, tuple, str]]:
    """(HF tensor name, Flax path, layout) for every parameter, in HF's order.

    Layouts (jaxpretrain/model/hf.py): `rows` (Flax has zero vocabulary-padding rows at the end),
    `same`, `t` (HF nn.Linear [out, in] is the Flax kernel [in, out]), `t_heads_out` (HF
    [heads*head_dim, in] is Flax [in, heads, head_dim]: q/k/v), `t_heads_in` (HF [out, heads*head_dim]
    is Flax [heads, head_dim, out]: o_proj), `heads` (HF bias [heads*head_dim] is Flax [heads, head_dim]).
    """
    b = biases(config)
    table = [("model.embed_tokens.weight", ("embed_tokens", "embedding"), "rows")]
    for i in range(config.num_hidden_layers):
        p, f = f"model.layers.{i}.", ("layers", i)
        table.append((p + "input_layernorm.weight", f + ("input_layernorm", "weight"), "same"))
        for proj in ("q_proj", "k_proj", "v_proj"):
            table.append((p + f"self_attn.{proj}.weight", f + ("self_attn", proj, "kernel"), "t_heads_out"))
            if b["qkv"]:
                table.append((p + f"self_attn.{proj}.bias", f + ("self_attn", proj, "bias"), "heads"))
        table.append((p + "self_attn.o_proj.weight", f + ("self_attn", "o_proj", "kernel"), "t_heads_in"))
        if b["o"]:
            table.append((p + "self_attn.o_proj.bias", f + ("self_attn", "o_proj", "bias"), "same"))
        table.append((p + "post_attention_layernorm.weight", f + ("post_attention_layernorm", "weight"), "same"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table.append((p + f"mlp.{proj}.weight", f + ("mlp", proj, "kernel"), "t"))
            if b["mlp"]:
                table.append((p + f"mlp.{proj}.bias", f + ("mlp", proj, "bias"), "same"))
    table.append(("model.norm.weight", ("norm", "weight"), "same"))
    if not config.tie_word_embeddings:
        table.append(("lm_head.weight", ("lm_head", "weight"), "rows"))
    return table


def param_count(config: PretrainedConfig) -> int:
    """Parameters as transformers counts them (a tied head once, no vocabulary padding)."""
    d, v, n_layer = config.hidden_size, config.vocab_size, config.num_hidden_layers
    q, kv, i = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config), config.intermediate_size
    b = biases(config)
    layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * i
    layer += b["qkv"] * (q + 2 * kv) + b["o"] * d + b["mlp"] * (2 * i + d)
    return v * d * (1 if config.tie_word_embeddings else 2) + n_layer * layer + d


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT/PaLM's 6N + 12 L H Q T.

    N counts every parameter a token's forward pass multiplies by: all of them except the input
    embedding table when it is a separate (untied) lookup; a tied table counts once, as the LM
    head's matmul. Norm weights and biases are included (they are negligible). 12 L H Q T is the
    attention score and value matmuls (H query heads of size Q over T positions), forward and
    backward, without halving for the causal mask, as nanoGPT and llm.c count it.
    """
    n = param_count(config)
    if not config.tie_word_embeddings:
        n -= config.vocab_size * config.hidden_size
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim(config) * seq_len
    return float(6 * n + attn)
