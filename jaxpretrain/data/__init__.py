"""The data path: Megatron `.bin/.idx` files -> GPT datasets and blends (Megatron-identical samples)
-> a Grain loader giving each process its share of every global batch."""

from jaxpretrain.data.blend import blending_indices
from jaxpretrain.data.builder import ONE_EPOCH, BlendedDataset, build_gpt_datasets
from jaxpretrain.data.gpt_dataset import GPTDataset

__all__ = ["ONE_EPOCH", "BlendedDataset", "GPTDataset", "blending_indices", "build_gpt_datasets"]
