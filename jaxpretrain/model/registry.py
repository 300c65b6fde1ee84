"""The model families, keyed by the `model_type` of their Hugging Face config.

Everything above `jaxpretrain/model/` (the train loop, checkpoints, export, bench, generate) reaches a
model through this registry: it never names a family. A family is one folder under
`jaxpretrain/model/` whose `__init__.py` defines `FAMILY = Family(...)`, plus one line in `_FAMILIES`.

A family's model class takes `(config, *, rngs, dtype, param_dtype, attention_impl, vocab_multiple,
remat)` and offers `__call__(input_ids, *, deterministic, rngs) -> float32 logits [B, T, vocab_size]`,
`hidden_states(...)` (after the final norm) and `head_weights() -> (W [V_padded, D], vocab_size)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

from jaxpretrain.errors import UserError

# Family packages, imported on first use (a CLI's --help must not import jax).
_FAMILIES = ("jaxpretrain.model.gpt2", "jaxpretrain.model.llama")
DEFAULT_MODEL_TYPE = "gpt2"  # a config dict without model_type is GPT-2's (HF GPT2Config.to_dict omits nothing, old files may)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its HF config handling, its NNX model and its HF weight names.

    name:           short name ("gpt2", "llama").
    model_types:    the HF `model_type` values it serves ("llama", "qwen2", "mistral").
    config_from:    (source, **overrides) -> validated HF config; source: None / built-in name / dict /
                    PretrainedConfig / directory / config.json path. Unsupported fields: UserError.
    model_class:    the flax.nnx Module.
    name_table:     (config) -> [(hf_name, flax_path_tuple, layout)] for every tensor, used both ways.
    flops_per_token:(config, seq_len) -> training FLOPs per token (6N + attention), for MFU.
    architecture:   (config) -> the HF `architectures` entry written on save ("GPT2LMHeadModel").
    max_positions:  (config) -> the longest sequence the model takes.
    dropout_active: (config) -> whether training draws dropout masks.
    builtin_names:  names that resolve to a built-in config without any download.
    optional_prefix:a prefix some checkpoints put on every name and others omit ("transformer.").
    ignored_tensors:name suffixes a checkpoint may carry that loading ignores (buffers).
    tied_copies:    (copy, original) pairs for tensors a tied checkpoint may store twice (lm_head.weight, a copy
                    of the embedding): loading skips a copy equal to its original and rejects one that
                    differs (transformers would then leave the head untied, a different model).
    """

    name: str
    model_types: tuple[str, ...]
    config_from: Callable[..., Any]
    model_class: type
    name_table: Callable[[Any], list]
    flops_per_token: Callable[[Any, int], float]
    architecture: Callable[[Any], str]
    max_positions: Callable[[Any], int]
    dropout_active: Callable[[Any], bool]
    builtin_names: tuple[str, ...] = ()
    optional_prefix: str = ""
    ignored_tensors: tuple[str, ...] = ()
    tied_copies: tuple[tuple[str, str], ...] = ()


_by_type: dict[str, Family] | None = None


def families() -> dict[str, Family]:
    """model_type -> Family for every registered family."""
    global _by_type
    if _by_type is None:
        table = {}
        for module in _FAMILIES:
            family = importlib.import_module(module).FAMILY
            for t in family.model_types:
                table[t] = family
        _by_type = table
    return _by_type


def family_for_type(model_type: str, where: str = "model_type") -> Family:
    table = families()
    if model_type not in table:
        raise UserError(f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(table))})")
    return table[model_type]


def family_of(config_or_source: Any) -> Family:
    """The family of an HF config object, a config dict, a built-in name, or a directory/config.json."""
    if config_or_source is None:
        return family_for_type(DEFAULT_MODEL_TYPE)
    model_type = getattr(config_or_source, "model_type", None)
    if isinstance(config_or_source, dict):
        model_type = config_or_source.get("model_type", DEFAULT_MODEL_TYPE)
    elif isinstance(config_or_source, (str, os.PathLike)):
        source = os.fspath(config_or_source)
        for family in dict.fromkeys(families().values()):
            if source in family.builtin_names and not os.path.exists(source):
                return family
        model_type = _model_type_of_file(source)
    if model_type is None:
        raise UserError(f"model config: cannot tell the model family of {type(config_or_source).__name__}")
    return family_for_type(model_type)


def read_config_json(source: str | os.PathLike, expected: str = "an HF directory or config.json") -> dict:
    """The JSON object of an HF directory's config.json (or of that file itself): one UserError
    line naming the file when it is missing (saying what was `expected`) or not a JSON object."""
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file (expected {expected})")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a config.json ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a config.json (a JSON object is expected)")
    return data


def _model_type_of_file(source: str) -> str:
    names = ", ".join(n for f in dict.fromkeys(families().values()) for n in f.builtin_names)
    expected = f"an HF directory, its config.json, or a built-in name: {names}"
    return read_config_json(source, expected).get("model_type", DEFAULT_MODEL_TYPE)


def config_from(source: Any = None, **overrides):
    """The validated HF config of `source` (see Family.config_from) for whichever family it names."""
    return family_of(source).config_from(source, **overrides)
