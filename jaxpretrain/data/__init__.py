"""The data path: Megatron `.bin/.idx` files -> GPT datasets and blends (Megatron-identical samples)
-> a Grain loader giving each process its share of every global batch."""

from jaxpretrain.data.blend import blending_indices
from jaxpretrain.data.builder import BlendedDataset, build_gpt_datasets
from jaxpretrain.data.gpt_dataset import GPTDataset

__all__ = ["BlendedDataset", "GPTDataset", "blending_indices", "build_gpt_datasets"]
