"""The on-disk index cache in Megatron's layout: `{md5}-{class}-{split}-{name}.npy` beside the JSON
description (`...-description.txt`) whose md5 names the files, so a changed input or config never hits
a stale cache and Megatron and we can share a cache directory. Files appear atomically, one process
builds while the others wait, and cached arrays are memory-mapped (and pickle as their file names).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Sequence

import numpy as np

from jaxpretrain.atomic import save_atomic
from jaxpretrain.errors import UserError

log = logging.getLogger(__name__)


def description_hash(description: str) -> str:
    return hashlib.md5(description.encode("utf-8"), usedforsecurity=False).hexdigest()


def describe(identifiers: dict) -> str:
    """Megatron's `json.dumps(unique_identifiers, indent=4, default=...)`; nested datasets and the
    tokenizer contribute their own identifier dicts."""
    return json.dumps(identifiers, indent=4, default=lambda obj: obj.unique_identifiers)


def _cache_paths(cache_dir: str, base: str, names: Sequence[str]) -> tuple[str, dict[str, str]]:
    description_path = os.path.join(cache_dir, f"{base}-description.txt")
    return description_path, {name: os.path.join(cache_dir, f"{base}-{name}.npy") for name in names}


def _load_cache(cache_dir: str, base: str, names: Sequence[str], description: str, shapes: dict | None):
    """(arrays, None) when every file of the cache is there, whole, and belongs to `description`;
    else (None, what is wrong). Nothing found is trusted on its name alone: Megatron writes its
    description first and its arrays with plain `np.save`, so a killed Megatron run leaves a
    description next to truncated or missing arrays, and a file may come from anywhere."""
    description_path, paths = _cache_paths(cache_dir, base, names)
    try:
        with open(description_path, "rb") as f:
            found = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None, None  # never built (or killed before its last file: the description comes last)
    except OSError as e:
        return None, f"{description_path}: unreadable ({e.strerror})"
    if found != description:
        return None, f"{description_path}: describes another configuration"
    arrays = {}
    for name, path in paths.items():
        try:
            arrays[name] = load_mapped(path)
        except FileNotFoundError:
            return None, f"{path}: missing"
        except (OSError, ValueError, EOFError) as e:  # truncated data or header, not an .npy at all
            return None, f"{path}: unreadable ({e})"
        want = (shapes or {}).get(name)
        if want is not None and arrays[name].shape != tuple(want):
            return None, f"{path}: shape {arrays[name].shape}, expected {tuple(want)}"
    return arrays, None


def cache_complete(cache_dir: str | None, base: str, names: Sequence[str], description: str, shapes=None) -> bool:
    """True when the cache holds every array, whole and of the expected shapes, for `description`."""
    if cache_dir is None:
        return False
    return _load_cache(cache_dir, base, names, description, shapes)[0] is not None


def cached_arrays(
    cache_dir: str | None, base: str, names: Sequence[str], description: str, build: Callable[[], dict],
    shapes: dict | None = None,
) -> dict:
    """The arrays `names` from `cache_dir/{base}-{name}.npy`, built by `build()` on a miss.

    A cache is used only when its description file holds `description` and every array loads with
    the shape in `shapes` (name -> shape); anything else (a truncated, missing or foreign file) is
    rebuilt, with a warning. Each file appears atomically (temp file + rename), the description
    last, so a build killed at any moment leaves nothing that passes for complete. Processes starting
    together take a file lock, so one builds and the others wait and then read the same files; every
    process gets read-only mmaps. Without a cache_dir the arrays are built in memory.
    """
    if cache_dir is None:
        return build()
    arrays, _ = _load_cache(cache_dir, base, names, description, shapes)
    if arrays is not None:
        return arrays
    from filelock import FileLock

    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"{cache_dir}: cannot create the index cache directory ({e.strerror})") from None
    description_path, paths = _cache_paths(cache_dir, base, names)
    with FileLock(os.path.join(cache_dir, f"{base}.lock")):
        arrays, problem = _load_cache(cache_dir, base, names, description, shapes)
        if arrays is not None:
            return arrays  # another process built it while this one waited
        if problem:
            log.warning("index cache %s: %s; rebuilding it", base, problem)
        _remove_leftovers(cache_dir, base)
        built = build()
        try:
            if os.path.exists(description_path):  # no moment where it vouches for a mix of old and new
                os.remove(description_path)
            for name, path in paths.items():
                save_atomic(path, lambda f, a=built[name]: np.save(f, a, allow_pickle=False))
            save_atomic(description_path, lambda f: f.write(description.encode("utf-8")))
        except OSError as e:
            raise UserError(f"{cache_dir}: cannot write the index cache ({e.strerror})") from None
        arrays, problem = _load_cache(cache_dir, base, names, description, shapes)
        if arrays is None:
            raise RuntimeError(f"index cache {base}: just written, yet {problem}")
    return arrays


def _remove_leftovers(cache_dir: str, base: str) -> None:
    """Temp files of this cache left by a writer that was killed: the lock is held, so nobody else
    is writing them."""
    for name in os.listdir(cache_dir):
        if name.startswith(".tmp-") and f"-{base}-" in name:
            try:
                os.remove(os.path.join(cache_dir, name))
            except OSError:
                pass


class MappedArray(np.ndarray):
    """A read-only mmap of a cached .npy as a plain ndarray (no np.memmap overhead per access), which
    pickles as its file name, so worker processes map the same file instead of copying it."""

    filename = None

    def __array_finalize__(self, obj):
        self.filename = None  # slices and results are not the file

    def __reduce__(self):
        if self.filename is None:
            return np.asarray(self).__reduce__()
        return load_mapped, (self.filename,)


def load_mapped(path: str) -> np.ndarray:
    mapped = np.load(path, allow_pickle=False, mmap_mode="r")
    array = mapped.view(MappedArray)
    array.filename = path
    return array
