"""The recipe's config sections that every model family shares, each field documented where it is set.

Section and field names follow NeMo Automodel's recipe YAML (`megatron_pretrain_gpt2.yaml`), so values
carry across; a family's config file (`configs/gpt2.py`, `configs/llama.py`) adds its `model` section
and its presets. The defaults are the seed's recipe (GPT-2 124M on FineWeb-Edu 10BT).
`python -m jaxpretrain.train --help` lists every field with the comment above it here.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

# Where the seed's preprocessing command writes FineWeb-Edu 10BT (see README).
FINEWEB_PREFIXES = "fineweb_edu/megatron_gpt2/processed_data_*_text_document*"
FINEWEB_MAPPING_DIR = "fineweb_edu/megatron_gpt2/mapping_dir"
# Where `scripts/quickstart.sh` writes the embedded default corpus (CPython's stdlib, GPT-2 tokens).
DEFAULT_PREFIXES = "data/stdlib_gpt2/processed_data_*_text_document*"
DEFAULT_MAPPING_DIR = "data/stdlib_gpt2/mapping_dir"

# Fields of a `model` section that are ours; every other field of it overrides the HF config
# (GPT-2's n_layer, Llama's hidden_size, ...) and is passed to the family's config_from.
MODEL_OPTIONS = (
    "pretrained_model_name_or_path", "dtype", "attention_impl", "vocab_multiple", "remat", "remat_policy", "scan_layers",
    "load_weights", "dropout",
)

# Validation fields that, left unset (None), take the train section's value: the seed's two sections
# name the same files, and validating on other files or another sequence length is never what an
# override of the train section alone means.
INHERITED_VALIDATION_FIELDS = ("paths", "index_mapping_dir", "tokenizer", "seq_length", "split", "seed")


def recipe_sections(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The whole recipe config: the family's `model` section first, then the shared sections."""
    c = ml_collections.ConfigDict()
    c.model = model

    c.dataset = ml_collections.ConfigDict()
    d = c.dataset
    # Megatron prefixes: a glob, one prefix, a list, a flat ["30", p1, "70", p2] weighted list, a
    # {"train": [...], "validation": [...]} dict, or a .json file holding one of these (JSON on the CLI).
    d.paths = FINEWEB_PREFIXES
    # Where the document/sample/shuffle index cache is written (Megatron's file names; built once).
    d.index_mapping_dir = FINEWEB_MAPPING_DIR
    # Tokenizer of the token files: HF name or directory; GPT-2's ("gpt2", "openai-community/gpt2") is embedded.
    d.tokenizer = "openai-community/gpt2"
    # Tokens per sample (the model sees seq_length inputs and predicts seq_length labels).
    d.seq_length = 1024
    # Document split train/validation/test, Megatron style: "0.99, 0.01, 0.00" or "900,50,50".
    d.split = "0.99, 0.01, 0.00"
    # Which split this section builds (always "train" here; kept for the seed's YAML shape).
    d.splits_to_build = "train"
    # Megatron's dataset shuffle seed (separate from rng.seed, as in Megatron-Core).
    d.seed = 1234
    # Train samples to build; None: max_steps x global_batch_size (the seed's rule).
    d.num_train_samples = placeholder(int)
    # Grain worker processes reading samples (0: read in a background thread of the trainer).
    d.worker_count = 0

    c.validation_dataset = ml_collections.ConfigDict()
    v = c.validation_dataset
    # Validation token files (same forms as dataset.paths); None: dataset.paths.
    v.paths = placeholder(str)
    # Index cache directory of the validation split; None: dataset.index_mapping_dir.
    v.index_mapping_dir = placeholder(str)
    # Tokenizer of the validation files; None: dataset.tokenizer.
    v.tokenizer = placeholder(str)
    # Tokens per validation sample; None: dataset.seq_length.
    v.seq_length = placeholder(int)
    # Document split of the validation files; None: dataset.split (validation takes the middle part).
    v.split = placeholder(str)
    # Which split this section builds (always "validation"; kept for the seed's YAML shape).
    v.splits_to_build = "validation"
    # Megatron's shuffle seed for the validation split; None: dataset.seed.
    v.seed = placeholder(int)
    # Validation samples per evaluation; 0: as NeMo sizes them, (train steps // val_every_steps, or
    # // 1000 without it) x global_batch_size, where train steps are num_train_samples // global batch
    # if set, else max_steps; without either, the whole validation split (one exhaustive epoch).
    v.num_val_samples = 1024
    # Validation batch size across all processes; None: global_batch_size // grad-accumulation steps.
    v.global_batch_size = placeholder(int)

    c.step_scheduler = ml_collections.ConfigDict()
    s = c.step_scheduler
    # Samples per optimizer step, over all devices and gradient-accumulation micro-batches.
    s.global_batch_size = 512
    # Samples per data-parallel rank per micro-batch; grad accumulation = global / (local x dp).
    s.local_batch_size = 32
    # Save a checkpoint every this many steps (and at the last step, and on SIGTERM).
    s.ckpt_every_steps = 1000
    # Also save one at the end of every epoch (NeMo's StepScheduler default; matters with num_epochs > 1).
    s.save_checkpoint_every_epoch = True
    # Run validation every this many steps; none: only at checkpoint steps (NeMo's default, with
    # validate_on_checkpoint); 0: never, and no validation data is built.
    s.val_every_steps = FieldReference(250, field_type=int)  # a number that may be set to None
    # Validate at every checkpoint step too (the last step included), as NeMo's StepScheduler does;
    # false: only every val_every_steps (frequent checkpoints for preemption then cost no validation).
    s.validate_on_checkpoint = True
    # Signal(s) that make the run save a checkpoint and exit 75 (NeMo's preemption_signal): a name
    # (SIGTERM, SIGUSR1 or USR1), a number, or several, comma-separated; none: no handler (the
    # signal's default action ends the run). Ctrl-C always saves and exits.
    s.preemption_signal = FieldReference("SIGTERM", field_type=str)  # may be set to None
    # Passes over the train split; the run ends at max_steps or when the data runs out.
    s.num_epochs = 1
    # Optimizer steps of the whole run; also the length of the LR schedule and, x global_batch_size,
    # the train samples built. None: num_epochs whole passes over a train split built as one
    # exhaustive epoch (NeMo's full-epoch training, Megatron's size None).
    s.max_steps = FieldReference(18500, field_type=int)  # a number that may be set to None
    # Send train metrics to W&B every this many steps (NeMo's remote logging: steps 1, n + 1, 2n + 1,
    # ..., its 0, n, 2n counted from 0); the JSONL files, TensorBoard, validation and HellaSwag
    # metrics get every record.
    s.log_remote_every_steps = 1

    c.rng = ml_collections.ConfigDict()
    # Seed of model init and dropout (the dataset has its own seed, dataset.seed).
    c.rng.seed = 1111

    c.checkpoint = ml_collections.ConfigDict()
    k = c.checkpoint
    # Save and resume checkpoints at all.
    k.enabled = True
    # Orbax checkpoints go here; rerunning the same command resumes from the newest complete one.
    k.checkpoint_dir = "checkpoints/"
    # Newest checkpoints kept (older ones deleted once a newer one is complete).
    k.max_to_keep = 3
    # Write checkpoints in a background thread while training continues.
    k.async_save = True
    # Also write a Hugging Face directory (config.json, model.safetensors, tokenizer) per checkpoint.
    k.save_consolidated = False
    # NeMo's restore_from: the checkpoint a run with no checkpoint of its own starts from (another
    # run's step directory, or a checkpoint_dir for its newest); its own checkpoint_dir's always win,
    # so a preempted run resumes from its progress. A step of checkpoint_dir must be its newest.
    # None or LATEST: checkpoint_dir's newest.
    k.restore_from = placeholder(str)

    c.distributed = ml_collections.ConfigDict()
    p = c.distributed
    # Data-parallel size over all devices; None: every device not used by tensor parallelism.
    p.dp_size = placeholder(int)
    # Replicated (HSDP) groups; parameters are sharded over dp_size / dp_replicate_size devices.
    p.dp_replicate_size = 1
    # Tensor-parallel size (heads, MLP and vocabulary split across devices).
    p.tp_size = 1
    # Context parallelism is not supported; kept for the seed's YAML shape (must be 1).
    p.cp_size = 1
    # Sequence parallelism is not supported; kept for the seed's YAML shape (must be False).
    p.sequence_parallel = False
    # Memory one device may use, GiB, checked against XLA's estimate before step 1; None: the device's own limit.
    p.device_memory_gib = placeholder(float)
    # Multi-process runs: seconds without a heartbeat before a process counts as dead and the others exit.
    p.heartbeat_timeout_s = 60

    c.loss_fn = ml_collections.ConfigDict()
    # Masked cross-entropy: summed float32 token CE / label tokens of the global batch (-100 ignored).
    c.loss_fn.name = "masked_ce"
    # Sequence positions per chunk of the loss (jaxpretrain/train/loss.py): float32 logits exist for
    # one chunk at a time (micro-batch x chunk_size x vocab), never the whole micro-batch; 0: off.
    c.loss_fn.chunk_size = 128

    c.optimizer = ml_collections.ConfigDict()
    o = c.optimizer
    # AdamW with decoupled weight decay, as torch.optim.AdamW.
    o.name = "adamw"
    # Peak learning rate (the schedule's max_lr).
    o.lr = 6e-4
    # AdamW's (beta1, beta2).
    o.betas = (0.9, 0.95)
    # Added to the square root of the second moment, as torch's AdamW.
    o.eps = 1e-8
    # Decoupled weight decay, applied to every parameter as the seed does (no exclusions).
    o.weight_decay = 0.1
    # Clip the global gradient norm to this (the logged grad_norm is before clipping); 0: off.
    o.max_grad_norm = 1.0
    # A non-finite loss or gradient norm is never applied; skip up to this many such steps in a row (each logged), 0: stop.
    o.skip_nonfinite_steps = 0

    c.lr_scheduler = ml_collections.ConfigDict()
    r = c.lr_scheduler
    # "cosine", "linear", "constant", "inverse-square-root" or "WSD" (Megatron's OptimizerParamScheduler).
    r.lr_decay_style = "cosine"
    # Linear warmup steps from init_lr to optimizer.lr; None: min(1000, the run's steps // 10) (NeMo's default).
    r.lr_warmup_steps = FieldReference(700, field_type=int)  # a number that may be set to None
    # The learning rate at the end of the decay.
    r.min_lr = 0.0
    # Warmup starts at init_lr; None: 0.1 x optimizer.lr (NeMo Automodel's default).
    r.init_lr = placeholder(float)
    # Steps of the decay; None: the run's steps (max_steps, or fewer when the epochs run out first).
    r.lr_decay_steps = placeholder(int)
    # The peak the warmup reaches; None: optimizer.lr.
    r.max_lr = placeholder(float)
    # WSD (warmup-stable-decay): max_lr after the warmup, then an anneal to min_lr over the decay's last this many steps.
    r.wsd_decay_steps = placeholder(int)
    # WSD's anneal: "linear", "cosine", "exponential" or "minus_sqrt" (required with WSD).
    r.lr_wsd_decay_style = placeholder(str)
    # The weight decay at step 0; None: optimizer.weight_decay.
    r.start_wd = placeholder(float)
    # The weight decay after wd_incr_steps (at least start_wd); None: optimizer.weight_decay.
    r.end_wd = placeholder(float)
    # Steps over which the weight decay moves from start_wd to end_wd; None: the run's steps.
    r.wd_incr_steps = placeholder(int)
    # "constant" (start_wd = end_wd), "linear" or "cosine" (Megatron's weight-decay increment).
    r.wd_incr_style = "constant"

    c.wandb = ml_collections.ConfigDict()
    w = c.wandb
    # Weights & Biases project; None: W&B off (the `wandb` package is needed only when set).
    w.project = placeholder(str)
    # W&B entity (team or user); None: your default.
    w.entity = placeholder(str)
    # W&B run name; None: W&B picks one.
    w.name = placeholder(str)
    # Directory for W&B's local files; None: W&B's default.
    w.save_dir = placeholder(str)
    # W&B group of related runs; None: none.
    w.group = placeholder(str)
    # W&B tags of the run: a list, or comma-separated.
    w.tags = ()
    # W&B notes shown with the run; None: none.
    w.notes = placeholder(str)
    # W&B mode: "online", "offline" (sync later with `wandb sync`) or "disabled"; None: W&B's default
    # (its WANDB_MODE). A resumed run continues the same W&B run: its id is kept in the run directory.
    w.mode = placeholder(str)

    c.eval = ml_collections.ConfigDict()
    e = c.eval
    # HellaSwag validation jsonl (ctx, endings, label) scored during training; None: no HellaSwag.
    e.hellaswag_path = placeholder(str)
    # Score HellaSwag every this many steps (and at the last step); None: every val_every_steps.
    e.eval_every_steps = placeholder(int)
    # Score only the first this many items (None: all 10,042 of the validation set).
    e.hellaswag_limit = placeholder(int)
    # Rows per HellaSwag batch over all devices (4 rows per item; a multiple of the data-parallel size).
    e.batch_size = 32

    c.logging = ml_collections.ConfigDict()
    # Run directory for the effective config, metrics JSONL and TensorBoard; None: <checkpoint_dir>/logs.
    c.logging.run_dir = placeholder(str)
    # Print the step line every this many steps (metrics files get every step).
    c.logging.log_every_steps = 1
    return c


def use_embedded_corpus(c: ml_collections.ConfigDict, seq_length: int = 128) -> None:
    """Point a config at the quick start's embedded corpus with small batches: the presets' "tiny"."""
    c.dataset.paths = DEFAULT_PREFIXES
    c.dataset.index_mapping_dir = DEFAULT_MAPPING_DIR
    c.dataset.seq_length = seq_length
    c.dataset.split = "0.98, 0.02, 0.00"
    c.validation_dataset.num_val_samples = 64
    c.step_scheduler.global_batch_size = 16
    c.step_scheduler.local_batch_size = 8
    c.step_scheduler.ckpt_every_steps = 100
    c.step_scheduler.val_every_steps = 50
    c.step_scheduler.max_steps = 200
    c.lr_scheduler.lr_warmup_steps = 20
    c.logging.log_every_steps = 10
