"""The GPT-2 family: HF `GPT2LMHeadModel` in Flax NNX (model.py), its config (config.py) and its HF
tensor names (weights.py)."""

from jaxpretrain.model.gpt2 import config as _config
from jaxpretrain.model.gpt2 import weights as _weights
from jaxpretrain.model.gpt2.config import ACTIVATIONS, config_from
from jaxpretrain.model.gpt2.model import MLP, Attention, Block, Dense, Embed, GPT2LMHeadModel, LayerNorm
from jaxpretrain.model.registry import Family

FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    config_from=config_from,
    model_class=GPT2LMHeadModel,
    name_table=_weights.name_table,
    flops_per_token=_config.flops_per_token,
    architecture=lambda config: "GPT2LMHeadModel",
    max_positions=lambda config: config.n_positions,
    dropout_active=_config.dropout_active,
    builtin_names=_config.BUILTIN_NAMES,
    optional_prefix=_weights.HF_PREFIX,
    ignored_tensors=_weights.IGNORED_SUFFIXES,
    tied_copies=_weights.TIED_COPIES,
)

__all__ = [
    "ACTIVATIONS", "Attention", "Block", "Dense", "Embed", "FAMILY", "GPT2LMHeadModel", "LayerNorm", "MLP",
    "config_from",
]
