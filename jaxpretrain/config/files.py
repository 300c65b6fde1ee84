"""Config files: a Python config with presets (`configs/gpt2.py:tiny`), NeMo Automodel's recipe YAML,
or the effective config a run wrote (`<run_dir>/config.yaml`), each loaded into one ConfigDict.

A `Loaded` carries the config, the schema (declared type of every field, from the Python config as
built) and what the file was, so overrides, `--help` and the effective config all agree.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from jaxpretrain.errors import UserError

# configs/ sits beside the package in a checkout; a relative --config that is not found from the
# current directory is looked up there too (running from elsewhere with configs/gpt2.py still works).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = "configs/gpt2.py"
YAML_SUFFIXES = (".yaml", ".yml")


@dataclasses.dataclass
class Loaded:
    cfg: ml_collections.ConfigDict
    types: dict[str, type]  # "section.field" -> declared type
    base: str  # the Python config and preset the fields come from: "/abs/configs/gpt2.py:124m"
    source: str  # what the user passed to --config
    notes: list[str] = dataclasses.field(default_factory=list)  # accepted keys that have no effect
    filled: list[str] = dataclasses.field(default_factory=list)  # values a recipe YAML left out, filled in as NeMo would


def resolve_path(path: str) -> str:
    """An existing config file for `path`: as given, else relative to the checkout's root."""
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(REPO_ROOT, path)]
    for p in candidates:
        if os.path.isfile(p):
            return os.path.abspath(p)
    raise UserError(f"--config {path}: no such config file")


def split_spec(spec: str) -> tuple[str, str | None]:
    """"configs/gpt2.py:tiny" -> ("configs/gpt2.py", "tiny"); a YAML path has no preset."""
    path, sep, arg = spec.partition(":")
    if not sep and not path.endswith(".py"):
        return spec, None
    return path, (arg or None)


def load_module(path: str):
    """Import a Python config file by path (it is not on sys.path)."""
    name = "jaxpretrain_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: not a Python config file ({e.msg})") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config(preset) function")
    return module


def presets_of(module) -> dict[str, str]:
    return dict(getattr(module, "PRESETS", {}) or {})


def load_python(path: str, preset: str | None, source: str | None = None) -> Loaded:
    from jaxpretrain.config.overrides import field_types

    path = resolve_path(path)
    module = load_module(path)
    presets = presets_of(module)
    if preset is not None and presets and preset.strip().lower() not in presets:
        raise UserError(f"--config {source or path}: unknown preset {preset!r}; presets of {os.path.basename(path)}: {', '.join(presets)}")
    try:
        cfg = module.get_config(preset)
    except ValueError as e:
        raise UserError(f"--config {source or path}: {e}") from None
    name = preset or (next(iter(presets)) if presets else "")
    return Loaded(cfg, field_types(cfg), f"{path}:{name}" if name else path, source or path)


def load(spec: str | None, overrides: tuple[tuple[str, str], ...] = (),
         nemo_flags: tuple[tuple[str, str], ...] = ()) -> Loaded:
    """The config named by --config: a .py file[:preset], a recipe YAML, or an effective config YAML.
    `nemo_flags` ((flag, value) pairs of NeMo's `--section.key VALUE`, config/nemo_yaml.py) set keys
    in that file's own key space first. `overrides` ((flag, value) pairs of `--config.*`, applied by
    the caller afterwards) keep a recipe YAML from noting a NeMo default for a key they set anyway."""
    from jaxpretrain.config.overrides import set_field

    spec = spec or DEFAULT_CONFIG
    path, preset = split_spec(spec)
    if path.endswith(YAML_SUFFIXES):
        from jaxpretrain.config import recipe_yaml

        return recipe_yaml.load_yaml(resolve_path(path), spec, overrides, nemo_flags)
    if not path.endswith(".py"):
        raise UserError(f"--config {spec}: expected a Python config (configs/gpt2.py[:preset]) or a YAML recipe (.yaml)")
    loaded = load_python(path, preset, spec)
    for flag, value in nemo_flags:  # a Python config's key space is its fields
        set_field(loaded.cfg, loaded.types, flag[2:], value, flag=flag)
    return loaded
