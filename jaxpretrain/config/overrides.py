"""`--config.section.field=value` overrides: typed by the field they replace, checked, one clear line.

A value is parsed by the type of the field it overrides (int, float, bool, str, tuple); `none`/`null`
unsets a field. A string that starts with `[` or `{` is JSON, so a weighted blend or a per-split dict
fits on the command line: `--config.dataset.paths='["30", "p0", "70", "p1"]'`. A field that does not
exist is an error that says which field was meant.
"""

from __future__ import annotations

import difflib
import json

import ml_collections

from jaxpretrain.errors import UserError

_NONE = ("none", "null", "None", "~")
_TRUE = ("true", "True", "1", "yes", "on")
_FALSE = ("false", "False", "0", "no", "off")


def leaf_paths(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field as "section.field" (nested sections joined by dots)."""
    out = []
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(leaf_paths(value, path + "."))
        else:
            out.append(path)
    return out


def field_types(cfg: ml_collections.ConfigDict) -> dict[str, type]:
    """path -> the type each leaf field was declared with (placeholders included), taken from a config
    as its file built it: the schema every later override is checked against."""
    types = {}
    for path in leaf_paths(cfg):
        *parents, name = path.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        types[path] = node.get_type(name)
    return types


def _unknown_field(path: str, types: dict, flag: str) -> UserError:
    candidates = list(types)
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not close:  # a right field name in the wrong section, or a wrong name in the right one
        name = path.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == name][:1]
    hint = f"; did you mean --config.{close[0]}?" if close else " (python -m jaxpretrain.train --help lists every field)"
    return UserError(f"{flag}: no such config field {path}{hint}")


def parse_value(raw, current, field_type, where: str):
    """`raw` (a command-line string, or an already-typed value from YAML) as the type of the field."""
    if not isinstance(raw, str):
        return _coerce(raw, current, field_type, where)
    text = raw.strip()
    if text.startswith("--config.") or text == "--config":
        # `--config.a.b --config.c=1`: the next flag was taken as this one's value
        raise UserError(f"{where}: no value given (write {where}=VALUE; the next flag, {text.split('=')[0]}, is not a value)")
    if text in _NONE:
        return None
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: {raw!r} is not valid JSON ({e.msg} at character {e.pos})") from None
    if field_type is bool:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UserError(f"{where}: {raw!r} is not true or false")
    if field_type is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{where}: {raw!r} is not a whole number") from None
    if field_type is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{where}: {raw!r} is not a number") from None
    if field_type in (tuple, list):
        items = [x.strip() for x in text.strip("()").split(",") if x.strip()]
        element = type(current[0]) if current else str
        return tuple(parse_value(x, None, element, where) for x in items)
    return text


def _coerce(value, current, field_type, where: str):
    """A typed value (YAML, JSON) checked against the field's type; ints become floats where needed."""
    if value is None or field_type in (None, type(None), object):
        return value
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if field_type in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(value)
    if field_type is str and isinstance(value, (list, dict)):
        return value  # structured data paths: a blend list or a per-split dict
    if field_type is bool and not isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not true or false")
    if field_type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{where}: {value!r} is not a number")
    if field_type is int and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{where}: {value!r} is not a whole number")
        return int(value)
    if field_type is str and not isinstance(value, str):
        return str(value)
    return value


def set_field(cfg: ml_collections.ConfigDict, types: dict[str, type], path: str, raw, flag: str | None = None) -> None:
    """Set the leaf `path` ("section.field") of `cfg` from `raw`, typed by the field's declared type
    (`types`, from `field_types` of the config as built)."""
    flag = flag or f"--config.{path}"
    if path not in types:
        raise _unknown_field(path, types, flag)
    *parents, name = path.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    field_type = types[path]
    current = node[name] if name in node else None
    value = parse_value(raw, current, field_type, flag)
    if field_type is tuple and isinstance(value, list):
        value = tuple(value)
    with node.unlocked():
        if name in node:
            # Replace rather than assign: ml_collections keeps the type of the value a field holds now
            # (NoneType after an unset, str before a blend list), the schema has the declared one.
            del node[name]
        node[name] = value


def plain(value):
    """A config value as plain Python (ConfigDicts as dicts, tuples as lists) for JSON/YAML and the data API."""
    if isinstance(value, ml_collections.ConfigDict):
        return {k: plain(value[k]) for k in value.keys()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
