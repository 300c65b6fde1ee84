"""GPT-2's Hugging Face tensor names <-> Flax parameter paths: one table, read both ways.

Layouts (see jaxpretrain/model/hf.py):
  same:  identical arrays (HF's Conv1D weights are already [in, out])
  rows:  Flax has extra zero rows at the end (vocab_multiple padding)
  qkv:   HF [..., 3*embed] is Flax [..., 3, embed]
"""

from __future__ import annotations

NAME_TABLE = (
    ("wte.weight", "wte.embedding", "rows"),
    ("wpe.weight", "wpe.embedding", "same"),
    ("h.{i}.ln_1.weight", "h.{i}.ln_1.scale", "same"),
    ("h.{i}.ln_1.bias", "h.{i}.ln_1.bias", "same"),
    ("h.{i}.attn.c_attn.weight", "h.{i}.attn.c_attn.kernel", "qkv"),
    ("h.{i}.attn.c_attn.bias", "h.{i}.attn.c_attn.bias", "qkv"),
    ("h.{i}.attn.c_proj.weight", "h.{i}.attn.c_proj.kernel", "same"),
    ("h.{i}.attn.c_proj.bias", "h.{i}.attn.c_proj.bias", "same"),
    ("h.{i}.ln_2.weight", "h.{i}.ln_2.scale", "same"),
    ("h.{i}.ln_2.bias", "h.{i}.ln_2.bias", "same"),
    ("h.{i}.mlp.c_fc.weight", "h.{i}.mlp.c_fc.kernel", "same"),
    ("h.{i}.mlp.c_fc.bias", "h.{i}.mlp.c_fc.bias", "same"),
    ("h.{i}.mlp.c_proj.weight", "h.{i}.mlp.c_proj.kernel", "same"),
    ("h.{i}.mlp.c_proj.bias", "h.{i}.mlp.c_proj.bias", "same"),
    ("ln_f.weight", "ln_f.scale", "same"),
    ("ln_f.bias", "ln_f.bias", "same"),
)
HF_PREFIX = "transformer."
# Buffers that some GPT-2 checkpoints carry and loading ignores.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The head is tied to wte; some checkpoints store it as well.
TIED_COPIES = (("lm_head.weight", HF_PREFIX + "wte.weight"),)


def expand(table, n_layer: int, prefix: str = "") -> list[tuple[str, tuple, str]]:
    """(HF name, Flax path tuple, layout) for every tensor of an n_layer model; `{i}` is the block."""
    pairs = []
    for hf, flax_path, layout in table:
        for i in range(n_layer) if "{i}" in hf else [None]:
            path = tuple(i if p == "{i}" else p for p in flax_path.split("."))
            pairs.append((prefix + hf.format(i=i), path, layout))
    return pairs


def name_table(config) -> list[tuple[str, tuple, str]]:
    """Every tensor of this config's model, HF names with their "transformer." prefix."""
    return expand(NAME_TABLE, config.n_layer, HF_PREFIX)
