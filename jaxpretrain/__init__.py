"""jaxpretrain: LLM pretraining in JAX/Flax from Megatron-format token files to Hugging Face."""

__version__ = "0.1.0"
