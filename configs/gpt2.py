"""GPT-2 pretraining configs: `--config configs/gpt2.py[:preset]`, presets "124m" (default) and "tiny".

"124m" is the seed's recipe (NeMo Automodel `megatron_pretrain_gpt2.yaml`) value for value: GPT-2 124M
on FineWeb-Edu 10BT preprocessed to Megatron `.bin/.idx`, seq 1024, global batch 512 (local 32),
18,500 steps, AdamW 6e-4 with 700 warmup steps and cosine decay to 0. Section and field names follow
that YAML, so a user can carry values across. "tiny" is the run-locally variant: a 2-layer model on the
embedded default corpus (CPython's stdlib) that trains in a few minutes on 2 CPU cores.

Any field can be overridden on the command line: `--config.step_scheduler.max_steps=100`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

# Where the seed's preprocessing command writes FineWeb-Edu 10BT (see README, "Data").
FINEWEB_PREFIXES = "fineweb_edu/megatron_gpt2/processed_data_*_text_document*"
FINEWEB_MAPPING_DIR = "fineweb_edu/megatron_gpt2/mapping_dir"
# Where `scripts/quickstart.sh` writes the embedded default corpus.
DEFAULT_PREFIXES = "data/stdlib_gpt2/processed_data_*_text_document*"
DEFAULT_MAPPING_DIR = "data/stdlib_gpt2/mapping_dir"


def _dataset(paths: str, mapping_dir: str, splits_to_build: str) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Megatron prefixes: a glob, one prefix, a list, a flat ["30", p1, "70", p2] weighted list, a
    # {"train", "validation", "test"} dict, or a .json file holding one of these.
    d.paths = paths
    # Where the document/sample/shuffle index cache is written (Megatron's file names; built once).
    d.index_mapping_dir = mapping_dir
    # Tokenizer of the token files: HF name or directory; "gpt2" is embedded (no network needed).
    d.tokenizer = "gpt2"
    # Tokens per sample (the model sees seq_length inputs and predicts seq_length labels).
    d.seq_length = 1024
    # Document split train/validation/test, Megatron style: "0.99, 0.01, 0.00" or "900,50,50".
    d.split = "0.99, 0.01, 0.00"
    # Which split this section builds: "train" or "validation".
    d.splits_to_build = splits_to_build
    # Megatron's dataset shuffle seed (separate from rng.seed, as in Megatron-Core).
    d.seed = 1234
    return d


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # HF GPT-2 config to start from: a directory/config.json, or "gpt2" (GPT-2 124M, embedded).
    c.model.pretrained_model_name_or_path = "gpt2"
    # Shape overrides on top of that config (None: keep the config's value).
    c.model.n_layer = placeholder(int)
    c.model.n_embd = placeholder(int)
    c.model.n_head = placeholder(int)
    c.model.n_positions = placeholder(int)
    c.model.vocab_size = placeholder(int)
    # Dropout probabilities (None: the HF config's, 0.1 for GPT-2, as the seed trains).
    c.model.dropout = placeholder(float)
    # Compute dtype of matmuls/activations; master weights and the loss stay float32.
    c.model.dtype = "bfloat16"
    # Attention kernel for jax.nn.dot_product_attention: "cudnn" (flash, GPU), "xla", or None (auto).
    c.model.attention_impl = placeholder(str)
    # Pad the embedding rows to a multiple of this (50257 -> 50304 at 128) for faster matmuls;
    # padded rows never show in logits or exported weights.
    c.model.vocab_multiple = 128
    # Recompute each block's activations in the backward pass (less memory, ~30% more FLOPs).
    c.model.remat = False
    # With remat: a jax.checkpoint_policies name saying what to keep, e.g.
    # "dots_with_no_batch_dims_saveable" (None: keep nothing, recompute all).
    c.model.remat_policy = placeholder(str)
    # Run the blocks as one lax.scan: XLA compiles one block instead of n_layer (faster compile);
    # parameters, checkpoints and HF weights are unchanged.
    c.model.scan_layers = False
    # Start from the HF checkpoint's weights instead of a fresh init (the seed pretrains from scratch).
    c.model.load_weights = False

    c.dataset = _dataset(FINEWEB_PREFIXES, FINEWEB_MAPPING_DIR, "train")
    # Train samples to build; None: max_steps x global_batch_size (the seed's rule).
    c.dataset.num_train_samples = placeholder(int)
    # Grain worker processes reading samples (0: read in a background thread of the trainer).
    c.dataset.worker_count = 0

    c.validation_dataset = _dataset(FINEWEB_PREFIXES, FINEWEB_MAPPING_DIR, "validation")
    # Validation samples per evaluation; 0: (max_steps // val_every_steps) x global_batch_size.
    c.validation_dataset.num_val_samples = 1024
    # Validation batch size across all processes; None: global_batch_size // grad-accumulation steps.
    c.validation_dataset.global_batch_size = placeholder(int)

    c.step_scheduler = ml_collections.ConfigDict()
    # Samples per optimizer step, over all devices and gradient-accumulation micro-batches.
    c.step_scheduler.global_batch_size = 512
    # Samples per data-parallel rank per micro-batch; grad accumulation = global / (local x dp).
    c.step_scheduler.local_batch_size = 32
    # Save a checkpoint every this many steps (and at the last step, and on SIGTERM).
    c.step_scheduler.ckpt_every_steps = 1000
    # Run validation every this many steps.
    c.step_scheduler.val_every_steps = 250
    # Passes over the train split; the run ends at max_steps or when the data runs out.
    c.step_scheduler.num_epochs = 1
    # Optimizer steps of the whole run; also the length of the LR schedule.
    c.step_scheduler.max_steps = 18500

    c.rng = ml_collections.ConfigDict()
    # Seed of model init and dropout (the dataset has its own seed, dataset.seed).
    c.rng.seed = 1111

    c.checkpoint = ml_collections.ConfigDict()
    # Save and resume checkpoints at all.
    c.checkpoint.enabled = True
    # Orbax checkpoints go here; rerunning the same command resumes from the newest complete one.
    c.checkpoint.checkpoint_dir = "checkpoints/"
    # Newest checkpoints kept (older ones deleted once a newer one is complete).
    c.checkpoint.max_to_keep = 3
    # Write checkpoints in a background thread while training continues.
    c.checkpoint.async_save = True
    # Also write a Hugging Face directory (config.json, model.safetensors, tokenizer) per checkpoint.
    c.checkpoint.save_consolidated = False

    c.distributed = ml_collections.ConfigDict()
    # Data-parallel size over all devices; None: every device not used by tensor parallelism.
    c.distributed.dp_size = placeholder(int)
    # Replicated (HSDP) groups; parameters are sharded over dp_size / dp_replicate_size devices.
    c.distributed.dp_replicate_size = 1
    # Tensor-parallel size (heads, MLP and vocabulary split across devices).
    c.distributed.tp_size = 1
    # Context parallelism is not supported; kept for the seed's YAML shape (must be 1).
    c.distributed.cp_size = 1
    # Sequence parallelism is not supported; kept for the seed's YAML shape (must be False).
    c.distributed.sequence_parallel = False

    c.loss_fn = ml_collections.ConfigDict()
    # Masked cross-entropy: summed float32 token CE / label tokens of the global batch (-100 ignored).
    c.loss_fn.name = "masked_ce"
    # Sequence positions per chunk of the loss (jaxpretrain/train/loss.py): float32 logits exist for
    # one chunk at a time (micro-batch x chunk_size x vocab), never the whole micro-batch; 0: off.
    c.loss_fn.chunk_size = 128

    c.optimizer = ml_collections.ConfigDict()
    # AdamW with decoupled weight decay, as torch.optim.AdamW.
    c.optimizer.name = "adamw"
    c.optimizer.lr = 6e-4
    c.optimizer.betas = (0.9, 0.95)
    c.optimizer.eps = 1e-8
    # Applied to every parameter, as the seed does (no exclusion of biases/LayerNorms).
    c.optimizer.weight_decay = 0.1
    # Clip the global gradient norm to this (the logged grad_norm is before clipping); 0: off.
    c.optimizer.max_grad_norm = 1.0

    c.lr_scheduler = ml_collections.ConfigDict()
    # "cosine", "linear", "constant" or "inverse-square-root" (Megatron's OptimizerParamScheduler).
    c.lr_scheduler.lr_decay_style = "cosine"
    c.lr_scheduler.lr_warmup_steps = 700
    c.lr_scheduler.min_lr = 0.0
    # Warmup starts at init_lr; None: 0.1 x optimizer.lr (NeMo Automodel's default).
    c.lr_scheduler.init_lr = placeholder(float)
    # Steps of the decay; None: step_scheduler.max_steps.
    c.lr_scheduler.lr_decay_steps = placeholder(int)

    c.wandb = ml_collections.ConfigDict()
    # Weights & Biases project; None: W&B off (the `wandb` package is needed only when set).
    c.wandb.project = placeholder(str)
    c.wandb.entity = placeholder(str)
    c.wandb.name = placeholder(str)
    c.wandb.save_dir = placeholder(str)

    c.logging = ml_collections.ConfigDict()
    # Run directory for TensorBoard events and metrics JSONL; None: <checkpoint_dir>/logs.
    c.logging.run_dir = placeholder(str)
    # Print the step line every this many steps (metrics files get every step).
    c.logging.log_every_steps = 1
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = (arg or "124m").strip().lower()
    c = _base()
    if preset == "124m":
        pass
    elif preset == "tiny":
        c.model.n_layer = 2
        c.model.n_embd = 128
        c.model.n_head = 4
        c.model.n_positions = 256
        c.model.dropout = 0.0
        c.model.dtype = "float32"
        c.model.vocab_multiple = 64
        for d in (c.dataset, c.validation_dataset):
            d.paths = DEFAULT_PREFIXES
            d.index_mapping_dir = DEFAULT_MAPPING_DIR
            d.seq_length = 128
            d.split = "0.98, 0.02, 0.00"
        c.validation_dataset.num_val_samples = 64
        c.step_scheduler.global_batch_size = 16
        c.step_scheduler.local_batch_size = 8
        c.step_scheduler.ckpt_every_steps = 100
        c.step_scheduler.val_every_steps = 50
        c.step_scheduler.max_steps = 200
        c.checkpoint.checkpoint_dir = "runs/tiny/checkpoints"
        c.optimizer.lr = 3e-3
        c.lr_scheduler.lr_warmup_steps = 20
        c.logging.log_every_steps = 10
    else:
        raise ValueError(f"configs/gpt2.py: unknown preset {arg!r}; use '124m' or 'tiny'")
    c.lock()
    return c
