"""Imported at start-up by every Python process the tests start (tests/conftest.py puts this directory
on PYTHONPATH): lets the processes of one multi-process CPU run share compiled programs.

JAX's persistent compilation cache keys a program by, among others, a fingerprint of the devices'
topology. On CPU each process of a multi-process run fingerprints its own view of it, so process 1's
keys differ from process 0's, and JAX writes entries from process 0 only: process 1 of every two-process
test run compiled every program afresh (about 10 s of CPU each, a dozen such runs in the suite). For
CPU devices alone, the key here hashes the device kinds instead of that fingerprint, JAX's own fallback
for backends without a topology; the device assignment stays in the key (the compile options), so a
process only ever loads a program compiled for the same global devices. On GPU JAX already makes
keys process-independent; nothing changes there. The patch is applied when JAX imports the module
(a process that never imports JAX pays nothing), and is skipped if JAX's internals change shape.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "jax._src.cache_key"


def _patch(cache_key) -> None:
    original = getattr(cache_key, "_hash_accelerator_config", None)
    hash_devices = getattr(cache_key, "_hash_devices", None)
    if original is None or hash_devices is None:
        return

    def hash_accelerator_config(hash_obj, accelerators):
        if all(getattr(d, "platform", None) == "cpu" for d in accelerators.flat):
            return hash_devices(hash_obj, accelerators)
        return original(hash_obj, accelerators)

    cache_key._hash_accelerator_config = hash_accelerator_config


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _TARGET not in sys.modules:
    sys.meta_path.insert(0, _PatchOnImport())
