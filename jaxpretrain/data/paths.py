"""What `dataset.paths` means: a glob, a prefix, a (weighted) list, a per-split dict, or a JSON file.

`parse_paths` turns any of them into one blend split by `split`, or one blend per split, following
Megatron's `get_blend_from_list` and NeMo Automodel's `get_list_of_files`.
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os

from jaxpretrain.data.indexed import get_prefix
from jaxpretrain.errors import UserError

# The per-split dict's keys (and `splits_to_build`'s names) -> split position.
SPLIT_KEYS = {"train": 0, "validation": 1, "valid": 1, "test": 2}
SPLIT_LABELS = ("train", "validation", "test")


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _expand(entry: str) -> list[str]:
    """A glob -> the sorted unique prefixes of its `.bin`/`.idx` matches (Automodel's
    `get_list_of_files`); anything else is one prefix (given with or without `.bin`/`.idx`)."""
    entry = entry.strip()
    if not _is_glob(entry):
        return [get_prefix(entry)]
    matches = globlib.glob(entry)
    if not matches:
        raise UserError(f"dataset.paths: {entry!r} matches no files")
    prefixes = set()
    for path in matches:
        if not path.endswith((".bin", ".idx")):
            raise UserError(f"{path}: matched by {entry!r} but not a .bin or .idx file")
        prefixes.add(os.path.splitext(path)[0])
    return sorted(prefixes)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def parse_blend(spec, where: str = "dataset.paths") -> tuple[list[str], list[float] | None]:
    """One distribution: (prefixes, weights or None), as Megatron's `get_blend_from_list`."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        return _expand(spec), None
    if not isinstance(spec, (list, tuple)) or not spec:
        raise UserError(f"{where}: expected a glob, a prefix or a non-empty list, got {spec!r}")
    items = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in spec]
    numeric = [_is_number(x) for x in items[::2]]
    if len(items) % 2 == 0 and any(numeric):
        if not all(numeric) or any(_is_number(x) for x in items[1::2]):
            raise UserError(
                f"{where}: a weighted list alternates numbers and prefixes: [w1, p1, w2, p2, ...]; got {spec!r}"
            )
        weights = [float(x) for x in items[::2]]
        bad = [x for x in weights if not (x > 0 and math.isfinite(x))]
        if bad:
            raise UserError(f"{where}: weights must be positive numbers, got {bad[0]!r}")
        prefixes = []
        for p in items[1::2]:
            if not isinstance(p, str):
                raise UserError(f"{where}: {p!r} is not a path")
            expanded = _expand(p)
            if len(expanded) != 1:
                raise UserError(
                    f"{where}: the weighted entry {p!r} must name one prefix, not a glob of {len(expanded)}"
                )
            prefixes += expanded
        return prefixes, weights
    prefixes = []
    for p in items:
        if not isinstance(p, str):
            raise UserError(f"{where}: {p!r} is not a path")
        prefixes += _expand(p)
    return prefixes, None


def parse_paths(paths):
    """`paths` -> ("blend", (prefixes, weights)) for one distribution split by `split`, or
    ("per_split", [blend or None] * 3) for a train/validation/test dict."""
    if isinstance(paths, os.PathLike):
        paths = os.fspath(paths)
    if isinstance(paths, str) and paths.strip().endswith(".json") and not _is_glob(paths):
        try:
            with open(paths.strip()) as f:
                paths = json.load(f)
        except OSError as e:
            raise UserError(f"{paths}: cannot read ({e.strerror})") from None
        except ValueError as e:
            raise UserError(f"{paths}: not valid JSON ({e})") from None
    if isinstance(paths, dict):
        unknown = set(paths) - set(SPLIT_KEYS)
        if unknown:
            raise UserError(f"dataset.paths: unknown split keys {sorted(unknown)} (use train, validation, test)")
        blends = [None, None, None]
        for key, value in paths.items():
            if value is not None:
                blends[SPLIT_KEYS[key]] = parse_blend(value, f"dataset.paths[{key!r}]")
        return "per_split", blends
    prefixes, weights = parse_blend(paths)
    if len(prefixes) == 1:
        weights = None  # Automodel: one path is used as is
    return "blend", (prefixes, weights)


def check_prefixes(prefixes) -> None:
    for prefix in prefixes:
        idx, bin_ = prefix + ".idx", prefix + ".bin"
        if not os.path.isfile(idx) and not os.path.isfile(bin_):
            raise UserError(f"{prefix}: no such dataset prefix (neither .bin nor .idx exists)")
