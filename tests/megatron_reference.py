"""megatron-core as the reference for the data path: synthetic token files and its dataset builder.

megatron-core's `BlendedMegatronDatasetBuilder` needs torch.distributed initialised; `init_gloo()` sets
up a one-process gloo group once per test session (a free localhost port).
"""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np

EOD = 0


class FakeTokenizer:
    """What GPTDatasetConfig asks of a tokenizer. pad -1 is outside every vocabulary, so Megatron never
    rewrites tokens (as with Automodel's HF tokenizers, whose pad collides with eos and is dropped)."""

    eod = EOD
    pad = -1
    vocab_size = 1000

    def __init__(self, name: str = "fake"):
        self.unique_identifiers = {"class": "FakeTokenizer", "name": name}


def write_corpus(
    prefix: str, num_docs: int, *, seed: int, mean_length: int = 40, vocab: int = 1000, empty_every: int = 0
):
    """A random `.bin/.idx` pair (uint16) written by megatron-core's own builder; returns the lengths.

    Documents end in EOD, as `--append-eod` writes them, and EOD also turns up inside a few (as in text
    that holds the literal end-of-text string): samples that span documents then carry EOD tokens
    where Megatron's do, and nothing on our side may mask, drop or rewrite them.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_length, num_docs)
    if empty_every:
        lengths[::empty_every] = 0
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in lengths:
        tokens = rng.integers(1, vocab, int(n)).astype(np.uint16)
        tokens[rng.random(int(n)) < 0.01] = EOD
        if n:
            tokens[-1] = EOD
        builder.add_document(tokens, [int(n)])
    builder.finalize(prefix + ".idx")
    return lengths


_INITIALISED = False


def init_gloo() -> None:
    global _INITIALISED
    if _INITIALISED:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    _INITIALISED = True


def build(blend=None, blend_per_split=None, *, split=None, seq_length, seed, sizes, cache_dir, tokenizer=None):
    """megatron-core's (train, valid, test) for a blend `(prefixes, weights or None)` or per-split blends."""
    init_gloo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer or FakeTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


def nemo_sampler_class():
    """NeMo Automodel's MegatronPretrainingSampler, read from its own file: the package that holds it
    imports HF `datasets` on the way (for chat datasets), which the test extra does not install."""
    import importlib.util

    import nemo_automodel

    path = os.path.join(os.path.dirname(nemo_automodel.__file__), "components/datasets/llm/megatron/sampler.py")
    spec = importlib.util.spec_from_file_location("nemo_megatron_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MegatronPretrainingSampler


def tokens_of(dataset, i: int) -> np.ndarray:
    """Megatron's sample i as the `seq_length + 1` token ids (input_ids + the last label)."""
    item = dataset[i]
    return np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]]).astype(np.int64)


def list_cache(cache_dir: str) -> dict[str, bytes]:
    """name -> bytes of every index file in a cache directory."""
    out = {}
    for name in sorted(os.listdir(cache_dir)):
        if name.endswith((".npy", ".txt")):
            with open(os.path.join(cache_dir, name), "rb") as f:
                out[name] = f.read()
    return out
