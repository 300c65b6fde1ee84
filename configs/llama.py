"""Llama pretraining configs: `--config configs/llama.py[:preset]`, presets "tiny", "150m" and "1b" (default).

The sections other than `model` are shared by every family (jaxpretrain/config/sections.py, the seed's
recipe layout); the `model` section's shape fields are transformers' LlamaConfig fields, each
overridable as `--config.model.hidden_size=...`. No preset needs a download: the shapes are written in.

"1b" is Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, RoPE
theta 500000 with llama3 scaling, tied embeddings, vocabulary 128256) on FineWeb-Edu tokenized with the
Llama 3 tokenizer; "150m" is a smaller Llama 3 of the same style (161M parameters with that vocabulary).
Both take the 124m recipe's 524,288-token steps. "tiny" trains on the embedded corpus (CPython's stdlib,
GPT-2-tokenized: vocabulary 50257) in a few minutes on 2 CPU cores, like configs/gpt2.py:tiny.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jaxpretrain.config.sections import recipe_sections, use_embedded_corpus

PRESETS = {
    "1b": "Llama 3.2 1B's shape on FineWeb-Edu 10BT tokenized for Llama 3 (default)",
    "150m": "a 161M Llama 3 (10 layers x 768, 12 heads over 4 kv heads) on the same data",
    "tiny": "2 layers x 128, 4 heads over 2 kv heads, on the embedded stdlib corpus, 200 steps on CPU in minutes",
}
# Where `python -m jaxpretrain.preprocess ... --pretrained-model-name-or-path meta-llama/Llama-3.2-1B`
# writes FineWeb-Edu 10BT (README, "Model").
FINEWEB_LLAMA3_PREFIXES = "fineweb_edu/megatron_llama3/processed_data_*_text_document*"
FINEWEB_LLAMA3_MAPPING_DIR = "fineweb_edu/megatron_llama3/mapping_dir"
LLAMA3_TOKENIZER = "meta-llama/Llama-3.2-1B"


def model_section() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # HF config to start from: "llama" / "qwen2" / "mistral" (transformers' defaults for that class,
    # no download), or an HF directory / config.json; the shape fields below override it (`none`: keep its).
    m.pretrained_model_name_or_path = "llama"
    # Vocabulary size; it must cover the token files' ids (None here and below: the source config's value).
    m.vocab_size = placeholder(int)
    # Width of the residual stream.
    m.hidden_size = placeholder(int)
    # Inner width of the SwiGLU MLP.
    m.intermediate_size = placeholder(int)
    # Decoder layers.
    m.num_hidden_layers = placeholder(int)
    # Query heads.
    m.num_attention_heads = placeholder(int)
    # Key/value heads; fewer than num_attention_heads is grouped-query attention.
    m.num_key_value_heads = placeholder(int)
    # Size of each head; None: hidden_size // num_attention_heads.
    m.head_dim = placeholder(int)
    # The longest sequence the model takes, in training and in generation.
    m.max_position_embeddings = placeholder(int)
    # RoPE as JSON: {"rope_type": "default" | "linear" | "llama3", "rope_theta": ..., the type's own keys}.
    m.rope_parameters = placeholder(dict)
    # RoPE base alone (sets rope_parameters["rope_theta"]).
    m.rope_theta = placeholder(float)
    # The LM head is the input embedding.
    m.tie_word_embeddings = placeholder(bool)
    # Biases on the q/k/v/o projections (Llama's attention_bias; Qwen2 configs always bias q/k/v).
    m.attention_bias = placeholder(bool)
    # RMSNorm's epsilon.
    m.rms_norm_eps = placeholder(float)
    # Std of the normal init of every projection and embedding (HF's _init_weights).
    m.initializer_range = placeholder(float)
    # Beginning-of-sequence id, written to the exported config (None: dataset.tokenizer's).
    m.bos_token_id = placeholder(int)
    # End-of-sequence id, written to the exported config: generation stops at it (None: dataset.tokenizer's).
    m.eos_token_id = placeholder(int)
    # Attention dropout probability (None: the config's, 0.0 for Llama, which pretrains without dropout).
    m.dropout = placeholder(float)
    # Compute dtype of matmuls/activations; master weights, RMSNorm statistics and the loss stay float32.
    m.dtype = "bfloat16"
    # Attention kernel for jax.nn.dot_product_attention: "cudnn" (flash, GPU), "xla", or None (auto).
    m.attention_impl = placeholder(str)
    # Pad the embedding and LM-head rows to a multiple of this for faster matmuls; never exported.
    m.vocab_multiple = 128
    # Recompute each block's activations in the backward pass (less memory, ~30% more FLOPs).
    m.remat = False
    # With remat: a jax.checkpoint_policies name saying what to keep, e.g.
    # "dots_with_no_batch_dims_saveable" (None: keep nothing, recompute all).
    m.remat_policy = placeholder(str)
    # Run the blocks as one lax.scan: XLA compiles one block instead of n_layer (faster compile);
    # parameters, checkpoints and HF weights are unchanged.
    m.scan_layers = False
    # Start from the HF checkpoint's weights instead of a fresh init.
    m.load_weights = False
    return m


def _llama3(m: ml_collections.ConfigDict, **shape) -> None:
    """Llama 3's style: GQA, RoPE theta 500000, tied embeddings, the Llama 3 tokenizer's vocabulary."""
    m.vocab_size = 128256
    m.max_position_embeddings = 131072
    m.tie_word_embeddings = True
    m.rms_norm_eps = 1e-5
    for name, value in shape.items():
        m[name] = value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = (arg or "1b").strip().lower()
    if preset not in PRESETS:
        raise ValueError(f"configs/llama.py: unknown preset {arg!r}; presets: {', '.join(PRESETS)}")
    c = recipe_sections(model_section())
    m = c.model
    if preset in ("150m", "1b"):
        c.dataset.paths = FINEWEB_LLAMA3_PREFIXES
        c.dataset.index_mapping_dir = FINEWEB_LLAMA3_MAPPING_DIR
        c.dataset.tokenizer = LLAMA3_TOKENIZER
        c.checkpoint.checkpoint_dir = f"checkpoints/llama_{preset}/"
    if preset == "150m":
        _llama3(m, hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    elif preset == "1b":
        _llama3(m, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, rope_parameters={
                    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        c.dataset.seq_length = 2048
        # 256 x 2048 = 524,288 tokens per step, the 124m recipe's; 3e-4 as Llama 3.2's smaller models.
        c.step_scheduler.global_batch_size = 256
        c.step_scheduler.local_batch_size = 8
        c.optimizer.lr = 3e-4
    elif preset == "tiny":
        m.vocab_size = 50257  # the embedded corpus is GPT-2-tokenized
        m.hidden_size, m.intermediate_size = 128, 384
        m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads = 2, 4, 2
        m.max_position_embeddings = 256
        m.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        m.tie_word_embeddings = True
        m.dtype = "float32"
        m.vocab_multiple = 64
        use_embedded_corpus(c, seq_length=128)
        c.checkpoint.checkpoint_dir = "runs/llama_tiny/checkpoints"
        c.optimizer.lr = 3e-3
    c.lock()
    return c
