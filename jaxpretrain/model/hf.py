"""Hugging Face checkpoints <-> Flax parameters for every family, through the family's name table.

Loading never materialises the full model anywhere: shapes come from the config, and each device's
shard is read straight from the safetensors file(s) (`get_slice`) by `jax.make_array_from_callback`,
which only asks for the shards this process's devices own. Saving gathers each parameter to the
host, undoes the layout changes (fused-qkv reshape, vocabulary padding, transposes) and writes
config.json plus model.safetensors that transformers' `AutoModelForCausalLM.from_pretrained` loads.

Layouts a name table may use (HF tensor <-> Flax parameter):
  same:  identical arrays
  rows:  Flax has extra zero rows at the end (vocab_multiple padding)
  qkv:   HF [..., 3*embed] is Flax [..., 3, embed] (GPT-2's fused attention)
  t:     HF nn.Linear weight [out, in] is the Flax kernel [in, out]
  t_heads_out: HF nn.Linear weight [heads*head_dim, in] is Flax [in, heads, head_dim] (q/k/v projections)
  t_heads_in:  HF nn.Linear weight [out, heads*head_dim] is Flax [heads, head_dim, out] (output projection)
  heads: HF bias [heads*head_dim] is Flax [heads, head_dim]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpretrain.atomic import usual_mode
from jaxpretrain.hf_dir import TOKENIZER_FILES, check_replaceable
from jaxpretrain.errors import UserError
from jaxpretrain.model.build import abstract_model, default_mesh, state_shardings
from jaxpretrain.model.gpt2 import weights as _gpt2_weights
from jaxpretrain.model.registry import config_from, family_of

def name_pairs(n_layer: int) -> list[tuple[str, tuple, str]]:
    """GPT-2's (HF name without "transformer.", Flax path, layout) pairs (kept for GPT-2 callers;
    any family's full table is `family_of(config).name_table(config)`)."""
    return _gpt2_weights.expand(_gpt2_weights.NAME_TABLE, n_layer)


def hf_shape(layout: str, flax_shape: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """The HF tensor shape that a Flax parameter of this shape and layout corresponds to."""
    if layout == "rows":
        return (vocab_size,) + tuple(flax_shape[1:])
    if layout == "qkv":
        return tuple(flax_shape[:-2]) + (flax_shape[-2] * flax_shape[-1],)
    if layout == "t":
        return tuple(flax_shape[::-1])
    if layout == "t_heads_out":
        return (flax_shape[1] * flax_shape[2], flax_shape[0])
    if layout == "t_heads_in":
        return (flax_shape[2], flax_shape[0] * flax_shape[1])
    if layout == "heads":
        return (flax_shape[0] * flax_shape[1],)
    return tuple(flax_shape)


def to_hf(layout: str, array: np.ndarray, vocab_size: int) -> np.ndarray:
    """A full Flax parameter as the HF tensor."""
    if layout == "rows":
        return array[:vocab_size]
    if layout == "qkv":
        return array.reshape(hf_shape(layout, array.shape, vocab_size))
    if layout == "t":
        return array.T
    if layout == "t_heads_out":
        return array.reshape(array.shape[0], -1).T
    if layout == "t_heads_in":
        return array.reshape(-1, array.shape[-1]).T
    if layout == "heads":
        return array.reshape(-1)
    return array


def read_shard(layout: str, tensor, flax_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The part `index` of a Flax parameter, read from an HF safetensors slice (or numpy array)."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, flax_shape)]
    bounds += [(0, n) for n in flax_shape[len(bounds):]]
    if layout == "same":
        return tensor[tuple(slice(a, b) for a, b in bounds)]
    if layout == "t":
        return np.asarray(tensor[tuple(slice(a, b) for a, b in bounds[::-1])]).T
    if layout == "rows":
        (r0, r1), rest = bounds[0], [slice(a, b) for a, b in bounds[1:]]
        real = int(tensor.get_shape()[0] if hasattr(tensor, "get_shape") else tensor.shape[0])
        top = min(r1, real)
        part = tensor[(slice(r0, top), *rest)] if top > r0 else None
        pad_shape = (r1 - max(r0, top),) + tuple(b - a for a, b in bounds[1:])
        pad = np.zeros(pad_shape, part.dtype if part is not None else np.float32)
        return pad if part is None else np.concatenate([part, pad]) if pad_shape[0] else part
    if layout == "qkv":
        # Flax [..., 3, embed] from HF [..., 3*embed]: one contiguous column range per q/k/v.
        *lead, (k0, k1), (e0, e1) = bounds
        width = flax_shape[-1]
        lead_idx = tuple(slice(a, b) for a, b in lead)
        parts = [tensor[(*lead_idx, slice(k * width + e0, k * width + e1))] for k in range(k0, k1)]
        return np.stack(parts, axis=len(lead))
    if layout in ("t_heads_out", "t_heads_in", "heads"):
        return _read_heads(layout, tensor, flax_shape, bounds)
    raise ValueError(f"unknown layout {layout!r}")


def _read_heads(layout, tensor, flax_shape, bounds) -> np.ndarray:
    """The per-head layouts: HF's flat heads*head_dim axis read as the column/row ranges of the
    wanted heads (one range when the shard holds whole heads, else one per head)."""
    if layout == "t_heads_out":
        (i0, i1), (h0, h1), (e0, e1) = bounds
    elif layout == "t_heads_in":
        (h0, h1), (e0, e1), (o0, o1) = bounds
    else:
        (h0, h1), (e0, e1) = bounds
    head_dim = flax_shape[2] if layout == "t_heads_out" else flax_shape[1]
    ranges = [(h0 * head_dim, h1 * head_dim)] if (e0, e1) == (0, head_dim) else [
        (h * head_dim + e0, h * head_dim + e1) for h in range(h0, h1)
    ]
    nh, ne = h1 - h0, e1 - e0
    if layout == "t_heads_out":  # HF [heads*head_dim, in]
        rows = np.concatenate([np.asarray(tensor[a:b, i0:i1]) for a, b in ranges], axis=0)
        return rows.T.reshape(i1 - i0, nh, ne)
    if layout == "t_heads_in":  # HF [out, heads*head_dim]
        cols = np.concatenate([np.asarray(tensor[o0:o1, a:b]) for a, b in ranges], axis=1)
        return cols.T.reshape(nh, ne, o1 - o0)
    return np.concatenate([np.asarray(tensor[a:b]) for a, b in ranges]).reshape(nh, ne)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


class _SafetensorsFiles:
    """Tensors of an HF directory by name, across model.safetensors or a sharded index."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e})") from None
            self.file_of = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, framework="numpy") as f:
                self.file_of = {name: single for name in f.keys()}
        else:
            raise UserError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        for file in set(self.file_of.values()):
            if not os.path.isfile(file):
                raise UserError(f"{file}: listed in the safetensors index but missing")
        self._open: dict[str, Any] = {}

    def names(self) -> set[str]:
        return set(self.file_of)

    def slice(self, name: str):
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file].get_slice(name)


def from_pretrained(
    path: str | os.PathLike,
    *,
    config=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    attention_impl: str | None = None,
    vocab_multiple: int = 1,
    remat: bool | str = False,
    scan_layers: bool = False,
) -> nnx.Module:
    """Load an HF directory (config.json + safetensors) of any family, sharded over `mesh` by the rules.

    `dtype` is the compute dtype; parameters are stored as `param_dtype` (float32 masters).
    `config` (anything `config_from` takes) replaces the directory's config.json, e.g. to change
    dropout; its shapes must still match the weights.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory (expected an HF model directory)")
    config = config_from(path if config is None else config)
    family = family_of(config)
    files = _SafetensorsFiles(path)
    # Some checkpoints omit the family's optional prefix ("transformer." in old GPT-2 files).
    opt = family.optional_prefix
    strip = bool(opt) and not any(n.startswith(opt) for n in files.names())
    mesh = mesh or default_mesh()
    graphdef, abstract = abstract_model(
        config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
        vocab_multiple=vocab_multiple, remat=remat, scan_layers=scan_layers,
    )
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
    variables = dict(nnx.to_flat_state(abstract))

    loaded, known = {}, set()
    for hf_name, flax_path, layout in family.name_table(config):
        name = hf_name.removeprefix(opt) if strip else hf_name
        known.add(name)
        if name not in files.names():
            raise UserError(f"{path}: tensor {name} missing from the safetensors files")
        tensor = files.slice(name)
        shape = tuple(variables[flax_path].shape)
        want = hf_shape(layout, shape, config.vocab_size)
        if tuple(tensor.get_shape()) != want:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.get_shape())}, config.json implies {want}")
        loaded[flax_path] = _load_array(tensor, layout, shape, shardings[flax_path].get_value(), param_dtype)

    for duplicate, original in family.tied_copies:
        original = original.removeprefix(opt) if strip else original
        if duplicate in files.names() and duplicate not in known:
            known.add(duplicate)
            if original in files.names() and not _same_tensor(files.slice(duplicate), files.slice(original)):
                raise UserError(
                    f"{path}: {duplicate} differs from {original} although config.json sets tie_word_embeddings "
                    "(a head of its own: set tie_word_embeddings to false where the family supports it)"
                )
    extra = sorted(n for n in files.names() - known if not n.endswith(family.ignored_tensors))
    if extra:
        raise UserError(f"{path}: unexpected tensors for this {family.name} config: {extra[:5]}")

    state = nnx.from_flat_state([(p, v.replace(loaded[p])) for p, v in nnx.to_flat_state(abstract)])
    return nnx.merge(graphdef, state)


def _same_tensor(a, b, rows: int = 4096) -> bool:
    """Whether two safetensors slices (matrices) hold equal values, read a block of rows at a time."""
    shape = tuple(a.get_shape())
    if shape != tuple(b.get_shape()):
        return False
    return bool(shape) and all(np.array_equal(a[i:min(i + rows, shape[0])], b[i:min(i + rows, shape[0])]) for i in range(0, shape[0], rows))


def _load_array(tensor, layout, shape, sharding, param_dtype) -> jax.Array:
    # Devices holding the same index (replicas) share one read.
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in cache:
            cache[key] = np.asarray(read_shard(layout, tensor, shape, index)).astype(param_dtype)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, read)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    # Multi-process: every process takes part in the gather; only process 0 writes.
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(
    model: nnx.Module, out_dir: str | os.PathLike, *, tokenizer=None, tokenizer_files_from=None
) -> None:
    """Write `out_dir` with config.json + model.safetensors (+ tokenizer files) for transformers.

    `tokenizer`: a tokenizer object or name ("gpt2": the embedded one) saved with it;
    `tokenizer_files_from`: a directory whose tokenizer files are copied. The directory appears
    atomically (written aside, then renamed into place). Every process must call this (shards are
    gathered); only process 0 writes.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_replaceable(out_dir)
    config = copy.deepcopy(model.config)
    family = family_of(config)
    config.architectures = [family.architecture(config)]
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    tensors = {}
    for hf_name, flax_path, layout in family.name_table(config):
        array = _to_host(flat[flax_path].get_value())
        tensors[hf_name] = np.ascontiguousarray(to_hf(layout, array, config.vocab_size))
    # The dtype of the tensors written, not the source's: transformers loads in config.json's dtype,
    # so a float32 export of a bf16 checkpoint that kept "bfloat16" would come back truncated.
    config.dtype = str(next(iter(tensors.values())).dtype)

    if jax.process_index() == 0:
        parent, name = os.path.split(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            config.to_json_file(os.path.join(tmp, "config.json"), use_diff=True)
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            if tokenizer is not None:
                from jaxpretrain.tokenizer import save_tokenizer

                save_tokenizer(tokenizer, tmp)
            if tokenizer_files_from is not None:
                _copy_tokenizer_files(tokenizer_files_from, tmp)
            usual_mode(tmp)  # safetensors writes 0600; teammates read exports
            _replace_dir(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"save_pretrained {out_dir}")


def _copy_tokenizer_files(source, dest: str) -> None:
    source = os.fspath(source)
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    if not found:
        raise UserError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) to copy")
    for f in found:
        shutil.copy2(os.path.join(source, f), os.path.join(dest, f))


def _replace_dir(src: str, dst: str) -> None:
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    old = f"{dst}.old-{os.getpid()}"
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
