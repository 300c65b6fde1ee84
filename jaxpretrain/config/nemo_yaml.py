"""How NeMo Automodel reads a recipe YAML before its recipe sees it, so a NeMo command line and YAML
work unchanged: command-line overrides and environment references.

Overrides: `--section.key VALUE`, `--section.key=VALUE`, or a bare `--section.key` (true), as its
`parse_args_and_load_config` takes them beside `--config`. They set a key of the file `--config`
names, in that file's own key space, before it is read: a recipe YAML's (`--model.config.n_layer 6`,
`--clip_grad_norm.max_norm 0.5`, `--dataset.tokenizer.pretrained_model_name_or_path gpt2`); a Python
config's or a run's config.yaml's fields (`--step_scheduler.max_steps 100`). Values are read as NeMo
reads them (`translate_value`: none/true/false, then a Python literal, else the string). Our own
`--config.section.field=VALUE` overrides apply after these.

Environment references in a recipe YAML's strings (and the overrides' values), as NeMo's
`resolve_yaml_env_vars`: `${VAR}`, `${VAR,default}`, `${oc.env:VAR}`, `$VAR` (dots may be part of a
name); an unset variable without a default is an error naming the key.
"""

from __future__ import annotations

import ast
import os
import re

from jaxpretrain.errors import UserError


def is_nemo_flag(name: str) -> bool:
    """`--a.b` (NeMo's dotted override), not one of ours (`--config`, `--config.a.b`)."""
    return name.startswith("--") and "." in name and name != "--config" and not name.startswith("--config.")


def value_of(argv: list[str], i: int) -> tuple[str, int]:
    """NeMo's value for the flag at argv[i] without `=`: the next token unless it is another `--` flag
    (then true). Returns (value, index of the last token used)."""
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[i + 1], i + 1
    return "True", i


_SPECIAL = {"none": None, "None": None, "true": True, "True": True, "false": False, "False": False}


def translate_value(raw: str):
    """NeMo's `translate_value`: a string token as the Python value it spells."""
    if raw in _SPECIAL:
        return _SPECIAL[raw]
    if len(raw) > 1000:  # NeMo does not evaluate pathological strings either
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def node_paths(data: dict, prefix: str = "") -> set[str]:
    """Every dotted path of a loaded YAML mapping (sections, keys and nested keys)."""
    paths = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict):
            paths |= node_paths(value, f"{path}.")
    return paths


def apply(data: dict, flags: tuple[tuple[str, str], ...]) -> set[str]:
    """Set each `--a.b.c` flag's value in `data` as NeMo's `set_by_dotted` does (missing or non-mapping
    parents become mappings); returns the dotted keys set, so errors can name the flag, not the file."""
    keys = set()
    for flag, raw in flags:
        dotted = flag.lstrip("-")
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = translate_value(raw)
        keys.add(dotted)
    return keys


class Where:
    """Names where a key of a loaded YAML came from in an error: the flag that set it, else the file."""

    def __init__(self, path: str, data: dict, flags: tuple[tuple[str, str], ...]):
        self.path = path
        self.file_paths = node_paths(data)  # before the flags are applied
        self.flag_keys = apply(data, flags)

    def __call__(self, key: str) -> str:
        dotted = key.split(" ", 1)[0]  # "lr_scheduler.min_lr (why)": the key is its first word
        if dotted in self.flag_keys:
            return f"--{dotted}"
        if dotted not in self.file_paths:  # a section or mapping only a flag brought: name that flag
            below = sorted(k for k in self.flag_keys if k.startswith(dotted + "."))
            if below:
                return f"--{below[0]}"
        return f"{self.path}: {key}"


_BRACED = re.compile(r"\$\{([^}]+)\}")
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)")


def resolve_env(data, where: Where, key: str = ""):
    """`data` with NeMo's environment references resolved in every string but `_target_`s and `*_fn`s
    (NeMo imports those)."""
    if isinstance(data, dict):
        return {k: v if k == "_target_" or str(k).endswith("_fn") else resolve_env(v, where, f"{key}.{k}".lstrip("."))
                for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_env(v, where, key) for v in data]
    if not isinstance(data, str) or "$" not in data:
        return data

    def env(name: str, default: str | None, token: str) -> str:
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise UserError(f"{where(key)}: environment variable {name} is not set (needed by {token})")

    def braced(match: re.Match) -> str:
        expr = match.group(1).strip()
        expr = expr[len("oc.env:"):].strip() if expr.startswith("oc.env:") else expr
        name, comma, default = expr.partition(",")
        return env(name.strip(), default.strip() if comma else None, match.group(0))

    text = _BRACED.sub(braced, data)
    return _DOLLAR.sub(lambda m: env(m.group(1), None, m.group(0)), text)
