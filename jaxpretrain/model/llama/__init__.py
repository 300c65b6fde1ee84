"""The Llama family (Llama 2/3, Qwen2, Mistral without sliding window): one module, differences as config."""

from jaxpretrain.model.llama.config import architecture, config_from, flops_per_token, name_table, param_count
from jaxpretrain.model.llama.model import LlamaForCausalLM

__all__ = ["LlamaForCausalLM", "architecture", "config_from", "flops_per_token", "name_table", "param_count"]
