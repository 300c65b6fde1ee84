"""The effective config a run writes to its run directory (`config.yaml`): every field after presets,
recipe YAML and overrides, under the Python config it started from (`base_config`); `--config` takes
it back (through recipe_yaml.load_yaml, which tells it from a recipe YAML by that key)."""

from __future__ import annotations

import os

import yaml

from jaxpretrain.config.files import Loaded, load_python, split_spec
from jaxpretrain.config.nemo_yaml import Where
from jaxpretrain.config.overrides import set_field
from jaxpretrain.errors import UserError

BASE_KEY = "base_config"  # present only in an effective config written by a run


def load_effective(path: str, spec: str, data: dict, where: Where) -> Loaded:
    base_path, preset = split_spec(str(data.pop(BASE_KEY)))
    loaded = load_python(base_path, preset, f"{path} ({BASE_KEY})")
    loaded.source = spec
    for section, fields in data.items():
        if not isinstance(fields, dict):
            raise UserError(f"{where(section)}: a mapping of fields is expected")
        for name, value in fields.items():
            set_field(loaded.cfg, loaded.types, f"{section}.{name}", value, flag=where(f"{section}.{name}"))
    return loaded


def write_effective(loaded: Loaded, cfg, path: str) -> None:
    """Write `cfg` (every field) as YAML that `--config path` takes back; atomically."""
    from jaxpretrain.config.overrides import plain

    body = {BASE_KEY: loaded.base, **plain(cfg)}
    text = (
        "# The effective config of a jaxpretrain run: every field, after presets, recipe YAML and overrides.\n"
        f"# Rerun it with: python -m jaxpretrain.train --config {path}\n"
        + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)
    )
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
