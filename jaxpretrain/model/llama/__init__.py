"""The Llama family (Llama 2/3, Qwen2, Mistral without sliding window): one NNX module (model.py), the
three HF config classes validated (config.py, which also holds the HF name table and FLOPs)."""

from jaxpretrain.model.llama import config as _config
from jaxpretrain.model.llama.config import architecture, config_from, flops_per_token, name_table
from jaxpretrain.model.llama.model import LlamaForCausalLM
from jaxpretrain.model.registry import Family

FAMILY = Family(
    name="llama",
    model_types=tuple(_config.CONFIG_CLASSES),
    config_from=config_from,
    model_class=LlamaForCausalLM,
    name_table=name_table,
    flops_per_token=flops_per_token,
    architecture=architecture,
    max_positions=lambda config: config.max_position_embeddings,
    dropout_active=lambda config: float(config.attention_dropout or 0.0) > 0,
    builtin_names=_config.BUILTIN_NAMES,
    # Old checkpoints carry RoPE's inv_freq buffers; tied checkpoints may also store lm_head.weight.
    ignored_tensors=("rotary_emb.inv_freq",),
    tied_copies=(("lm_head.weight", "model.embed_tokens.weight"),),
)

__all__ = ["FAMILY", "LlamaForCausalLM", "architecture", "config_from", "flops_per_token", "name_table"]
