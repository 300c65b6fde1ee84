"""What a Hugging Face model directory holds, known without jax: `export` refuses a bad --output at once."""

from __future__ import annotations

import os

from jaxpretrain.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
# What an HF model directory holds: the only entries an existing output directory may have for
# save_pretrained / export to replace it (anything else is the user's, and is not deleted).
MODEL_DIR_FILES = frozenset(TOKENIZER_FILES) | {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "README.md",
}


def check_replaceable(out_dir: str) -> None:
    """UserError unless `out_dir` is absent, empty, or an HF model directory (config.json and
    nothing but model and tokenizer files): writing replaces the whole directory."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise UserError(f"{out_dir}: exists and is not a directory; choose another output")
    entries = os.listdir(out_dir)
    if not entries:
        return
    foreign = sorted(e for e in entries if e not in MODEL_DIR_FILES and not _is_shard_name(e))
    if foreign or "config.json" not in entries:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise UserError(
            f"{out_dir}: exists and is not a model directory ({shown or 'no config.json'}); it would be "
            "replaced as a whole: choose another output or remove it"
        )


def _is_shard_name(name: str) -> bool:
    return name.startswith("model-") and name.endswith(".safetensors")
