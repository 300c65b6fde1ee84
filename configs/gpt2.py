"""GPT-2 pretraining configs: `--config configs/gpt2.py[:preset]`, presets "124m" (default) and "tiny".

"124m" is the seed's recipe (NeMo Automodel `megatron_pretrain_gpt2.yaml`) value for value: GPT-2 124M
on FineWeb-Edu 10BT preprocessed to Megatron `.bin/.idx`, seq 1024, global batch 512 (local 32),
18,500 steps, AdamW 6e-4 with 700 warmup steps and cosine decay to 0. The sections other than `model`
are shared by every family (jaxpretrain/config/sections.py). "tiny" is the run-locally variant: a
2-layer model on the embedded default corpus (CPython's stdlib) that trains in minutes on 2 CPU cores.

Any field can be overridden on the command line: `--config.step_scheduler.max_steps=100`;
`python -m jaxpretrain.train --help` lists them all.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jaxpretrain.config.sections import recipe_sections, use_embedded_corpus

PRESETS = {
    "124m": "GPT-2 124M, the seed's recipe on FineWeb-Edu 10BT (default)",
    "tiny": "2 layers x 128 wide on the embedded stdlib corpus, 200 steps on CPU in minutes",
}


def model_section() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # HF config to start from: a directory or config.json (its model_type picks the family), or a built-in
    # ("gpt2" or "openai-community/gpt2": GPT-2 124M, built in, no download).
    m.pretrained_model_name_or_path = "openai-community/gpt2"
    # GPT-2 shape overrides on top of that config (None: keep the config's value).
    m.n_layer = placeholder(int)
    m.n_embd = placeholder(int)
    m.n_head = placeholder(int)
    m.n_positions = placeholder(int)
    m.vocab_size = placeholder(int)
    # Beginning- and end-of-sequence ids of the exported config; generation stops at eos (None:
    # dataset.tokenizer's, 50256 for GPT-2's).
    m.bos_token_id = placeholder(int)
    m.eos_token_id = placeholder(int)
    # Dropout probability for embeddings, attention and residuals (None: the HF config's, 0.1 for GPT-2).
    m.dropout = placeholder(float)
    # Compute dtype of matmuls/activations; master weights and the loss stay float32.
    m.dtype = "bfloat16"
    # Attention kernel for jax.nn.dot_product_attention: "cudnn" (flash, GPU), "xla", or None (auto).
    m.attention_impl = placeholder(str)
    # Pad the embedding rows to a multiple of this (50257 -> 50304 at 128) for faster matmuls;
    # padded rows never show in logits or exported weights.
    m.vocab_multiple = 128
    # Recompute each block's activations in the backward pass (less memory, ~30% more FLOPs).
    m.remat = False
    # With remat: a jax.checkpoint_policies name saying what to keep, e.g.
    # "dots_with_no_batch_dims_saveable" (None: keep nothing, recompute all).
    m.remat_policy = placeholder(str)
    # Run the blocks as one lax.scan: XLA compiles one block instead of n_layer (faster compile);
    # parameters, checkpoints and HF weights are unchanged.
    m.scan_layers = False
    # Start from the HF checkpoint's weights instead of a fresh init (the seed pretrains from scratch).
    m.load_weights = False
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = (arg or "124m").strip().lower()
    if preset not in PRESETS:
        raise ValueError(f"configs/gpt2.py: unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
    c = recipe_sections(model_section())
    if preset == "tiny":
        c.model.n_layer = 2
        c.model.n_embd = 128
        c.model.n_head = 4
        c.model.n_positions = 256
        c.model.dropout = 0.0
        c.model.dtype = "float32"
        c.model.vocab_multiple = 64
        use_embedded_corpus(c, seq_length=128)
        c.checkpoint.checkpoint_dir = "runs/tiny/checkpoints"
        c.optimizer.lr = 3e-3
    c.lock()
    return c
