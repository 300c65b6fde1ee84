"""NeMo Automodel's recipe YAML (the seed's `megatron_pretrain_gpt2.yaml`) as our config; `load_yaml`
also reads back the effective config a run writes (`config.yaml`, config/effective.py).

A recipe YAML starts from the model family's config file at its default preset (`configs/gpt2.py:124m`
for GPT-2: the seed's recipe), and each section's keys replace fields, as the README's table shows.
A `_target_` we implement is accepted; any other `_target_`, or a key we do not know, is one line
naming it and what is supported; keys that only matter to torch (`dist_env.backend`,
`dataloader.collate_fn`, ...) are accepted and listed in one note. Within an `optimizer` section with
`_target_: torch.optim.AdamW`, arguments it leaves out take torch's defaults, as they would in NeMo.
"""

from __future__ import annotations

import os

import yaml

from jaxpretrain.config.effective import BASE_KEY, load_effective
from jaxpretrain.config.files import REPO_ROOT, Loaded, load_python
from jaxpretrain.config.nemo_yaml import Where, resolve_env
from jaxpretrain.config.overrides import set_field
from jaxpretrain.errors import UserError

# Accepted `_target_` values per section (NeMo's import paths; short aliases it also resolves).
TARGETS = {
    "model": {
        "nemo_automodel.NeMoAutoModelForCausalLM.from_config": False,
        "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained": True,
        "nemo_automodel.components._transformers.auto_model.NeMoAutoModelForCausalLM.from_config": False,
        "nemo_automodel.components._transformers.auto_model.NeMoAutoModelForCausalLM.from_pretrained": True,
        "transformers.AutoModelForCausalLM.from_config": False,
        "transformers.AutoModelForCausalLM.from_pretrained": True,
    },
    "model.config": ("transformers.AutoConfig.from_pretrained",),
    "dataset": ("nemo_automodel.components.datasets.llm.megatron_dataset.MegatronPretraining",),
    "tokenizer": ("transformers.AutoTokenizer.from_pretrained", "nemo_automodel.NeMoAutoTokenizer.from_pretrained"),
    "rng": ("nemo_automodel.components.training.rng.StatefulRNG",),
    "distributed": ("nemo_automodel.components.distributed.fsdp2.FSDP2Manager",),
    "loss_fn": ("nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy",),
    "dataloader": ("torchdata.stateful_dataloader.StatefulDataLoader", "torch.utils.data.DataLoader"),
    "optimizer": ("torch.optim.AdamW",),
}
# torch.optim.AdamW's defaults: what NeMo uses for an argument the YAML leaves out.
TORCH_ADAMW_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


# NeMo Automodel's `LRSchedulerConfig.build` for a key an `lr_scheduler` section leaves out, where the
# base preset's value (the seed's) differs; the other keys default as NeMo's do (init_lr 0.1 x lr,
# max_lr = lr, decay and weight-decay steps = the run's steps, start_wd = end_wd = weight_decay).
# Without the section NeMo builds no scheduler: a constant lr. NeMo's warmup is min(1000, total // 10)
# of its total steps, min(max_steps, epochs x epoch length), known once the data is built: None here,
# which train/schedule.py resolves the same way.
NEMO_SCHEDULER_DEFAULTS = {"lr_warmup_steps": None, "lr_decay_style": "cosine"}
NEMO_MIN_LR_FRACTION = 0.01  # min_lr = 0.01 x lr
NEMO_WANDB_PROJECT = "automodel"  # WandbConfig.project's default


# NeMo Automodel's `StepSchedulerConfig` (0.7) for a `step_scheduler` key the YAML leaves out, where
# the base preset's value (the seed's) differs; `local_batch_size` is the recipe's
# `cfg.get("step_scheduler.local_batch_size", 1)`. (Its validate_on_checkpoint and
# save_checkpoint_every_epoch defaults, true, are ours too.) Without max_steps NeMo trains num_epochs
# whole epochs of a train split built as one exhaustive epoch (Megatron's size None), as we then do.
NEMO_STEP_SCHEDULER_DEFAULTS = {
    "global_batch_size": 32, "local_batch_size": 1, "ckpt_every_steps": 100, "val_every_steps": None, "num_epochs": 10,
    "max_steps": None,
}


# section -> {key: our field}; keys mapped to None are accepted and noted (no effect in JAX).
FIELDS = {
    "step_scheduler": {
        "global_batch_size": "step_scheduler.global_batch_size",
        "local_batch_size": "step_scheduler.local_batch_size",
        "ckpt_every_steps": "step_scheduler.ckpt_every_steps",
        "val_every_steps": "step_scheduler.val_every_steps",
        "validate_on_checkpoint": "step_scheduler.validate_on_checkpoint",
        "save_checkpoint_every_epoch": "step_scheduler.save_checkpoint_every_epoch",
        "gc_every_steps": None,  # torch's host memory; JAX frees device buffers as their arrays die
        "num_epochs": "step_scheduler.num_epochs",
        "max_steps": "step_scheduler.max_steps",
        "preemption_signal": "step_scheduler.preemption_signal",
        "log_remote_every_steps": "step_scheduler.log_remote_every_steps",
        "loss_average_window_steps": None,  # NeMo's LLM recipes never read it (only its retrieval recipes)
    },
    "dist_env": {"backend": None, "timeout_minutes": None},
    "rng": {"seed": "rng.seed", "ranked": None},
    "checkpoint": {
        "enabled": "checkpoint.enabled",
        "checkpoint_dir": "checkpoint.checkpoint_dir",
        "save_consolidated": "checkpoint.save_consolidated",
        "max_recent_checkpoints": "checkpoint.max_to_keep",
        "model_save_format": None,
        "is_async": "checkpoint.async_save",
        "restore_from": "checkpoint.restore_from",
    },
    "distributed": {
        "dp_size": "distributed.dp_size",
        "dp_replicate_size": "distributed.dp_replicate_size",
        "tp_size": "distributed.tp_size",
        "cp_size": "distributed.cp_size",
        "sequence_parallel": "distributed.sequence_parallel",
    },
    "loss_fn": {},
    "dataloader": {"collate_fn": None, "num_workers": "dataset.worker_count", "pin_memory": None, "persistent_workers": None},
    "validation_dataloader": {"collate_fn": None, "num_workers": None, "pin_memory": None, "persistent_workers": None},
    "optimizer": {
        "lr": "optimizer.lr",
        "betas": "optimizer.betas",
        "eps": "optimizer.eps",
        "weight_decay": "optimizer.weight_decay",
        "fused": None,
        "foreach": None,
    },
    "lr_scheduler": {  # NeMo's LRSchedulerConfig, as OptimizerParamScheduler names its arguments
        key: f"lr_scheduler.{key}" for key in (
            "lr_decay_style", "lr_warmup_steps", "min_lr", "init_lr", "lr_decay_steps", "max_lr",
            "wsd_decay_steps", "lr_wsd_decay_style", "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style",
        )
    },
    "clip_grad_norm": {"max_norm": "optimizer.max_grad_norm"},
    "wandb": {  # NeMo's WandbConfig fields, and the wandb.init arguments it forwards that we take too
        key: f"wandb.{key}" for key in ("project", "entity", "name", "save_dir", "group", "tags", "notes", "mode")
    } | {"dir": "wandb.save_dir", "enable": None},
}
DATASET_FIELDS = {
    "paths": "paths",
    "index_mapping_dir": "index_mapping_dir",
    "seq_length": "seq_length",
    "split": "split",
    "seed": "seed",
    "num_dataset_builder_threads": None,
    "mmap_bin_files": None,
    "create_attention_mask": None,
}


def load_yaml(path: str, spec: str, overrides: tuple[tuple[str, str], ...] = (),
              nemo_flags: tuple[tuple[str, str], ...] = ()) -> Loaded:
    """A recipe YAML or a run's effective config; `nemo_flags` (NeMo's `--section.key VALUE`) set its
    keys first, `overrides` (our `--config.*` flags, applied by the caller) only silence notes."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a YAML mapping of config sections is expected")
    where = Where(path, data, nemo_flags)
    if BASE_KEY in data:  # our own file: its strings are literal
        return load_effective(path, spec, data, where)
    return _Recipe(path, spec, resolve_env(data, where), dict(overrides), where).load()


# ------------------------------------------------------------------------------------- recipe YAML


class _Recipe:
    def __init__(self, path: str, spec: str, data: dict, overrides: dict[str, str] | None = None, where: Where | None = None):
        self.path, self.spec, self.data = path, spec, data
        self.where = where or Where(path, data, ())  # the file, or the NeMo-style flag that set a key
        self.overrides = overrides or {}  # the command line's --config.* flags, applied after loading
        self.notes: list[str] = []
        self.loaded: Loaded | None = None

    def error(self, key: str, what: str) -> UserError:
        return UserError(f"{self.where(key)}: {what}")

    def target(self, section: str, node: dict, key: str, allowed) -> str | None:
        target = node.get("_target_")
        if target is None:
            return None
        if target not in allowed:
            return_list = ", ".join(allowed)
            raise self.error(f"{key}._target_", f"{target!r} is not supported (supported: {return_list})")
        return target

    def set(self, field: str, value, key: str) -> None:
        set_field(self.loaded.cfg, self.loaded.types, field, value, flag=self.where(key))

    def load(self) -> Loaded:
        model = self.data.get("model")
        if not isinstance(model, dict):
            raise self.error("model", "the recipe has no model section (model.config.pretrained_model_name_or_path)")
        name, load_weights, config_kwargs = self.model_source(model)
        self.loaded = self.base_for(name)
        self.loaded.source = self.spec
        self.loaded.filled = []  # NeMo defaults filled in, for one note each
        self.set("model.pretrained_model_name_or_path", name, "model")
        self.set("model.load_weights", load_weights, "model._target_")
        # The YAML's model is its HF config plus its own kwargs: the base preset's shape fields (Llama
        # 1B's, say) must not override it.
        from jaxpretrain.config.sections import MODEL_OPTIONS

        for field in [p for p in self.loaded.types if p.startswith("model.")]:
            if field.split(".", 1)[1] not in MODEL_OPTIONS and self.loaded.cfg.model[field.split(".", 1)[1]] is not None:
                self.set(field, None, "model.config")
        for k, v in config_kwargs.items():
            if f"model.{k}" not in self.loaded.types:
                raise self.error(f"model.config.{k}", f"not a model field of {os.path.basename(self.loaded.base.split(':')[0])} "
                                 "(python -m jaxpretrain.train --help lists them)")
            self.set(f"model.{k}", v, f"model.config.{k}")
        for section, node in self.data.items():
            if section == "model":
                continue
            if node is None:
                continue
            if not isinstance(node, dict):
                raise self.error(section, "a mapping of keys is expected")
            if section in ("dataset", "validation_dataset"):
                self.dataset(section, node)
            elif section in FIELDS:
                self.section(section, node)
            else:
                supported = ", ".join(["model", "dataset", "validation_dataset", *FIELDS])
                raise self.error(section, f"section not supported (supported: {supported})")
        self.step_scheduler_defaults()
        self.scheduler_defaults()
        self.inherit_validation_fields()
        self.loaded.notes = self.notes
        return self.loaded

    def scheduler_defaults(self) -> None:
        """What NeMo schedules where the YAML says nothing: its own defaults for the `lr_scheduler`
        keys left out (not the base preset's, which are the seed's), a constant lr without the
        section. Each value filled in is listed in one note, so none of them is a surprise."""
        cfg, filled = self.loaded.cfg, []
        node = self.data.get("lr_scheduler")
        if not node:  # absent, null or {}: NeMo's typed config then has no scheduler
            values = {"lr_decay_style": "constant", "lr_warmup_steps": 0}
            why = "no lr_scheduler section: a constant optimizer.lr, as NeMo without a scheduler"
        else:
            nemo = {"min_lr": NEMO_MIN_LR_FRACTION * float(cfg.optimizer.lr), **NEMO_SCHEDULER_DEFAULTS}
            values = {k: v for k, v in nemo.items() if k not in node}
            why = "NeMo Automodel's defaults for lr_scheduler keys the YAML leaves out"
        for key, value in values.items():
            self.set(f"lr_scheduler.{key}", value, f"lr_scheduler.{key} ({why})")
            shown = "min(1000, steps // 10)" if value is None else f"{value:g}" if isinstance(value, float) else value
            filled.append(f"lr_scheduler.{key}={shown}")
        self.loaded.filled += [f"{why}: {', '.join(filled)}"] if filled else []

    def step_scheduler_defaults(self) -> None:
        """NeMo's StepSchedulerConfig values for the `step_scheduler` keys left out (one note lists them;
        a key the command line sets is not listed)."""
        node = self.data.get("step_scheduler") or {}
        filled = []
        for key, value in NEMO_STEP_SCHEDULER_DEFAULTS.items():
            if key not in node and f"--config.step_scheduler.{key}" not in self.overrides:
                self.set(f"step_scheduler.{key}", value, f"step_scheduler.{key} (NeMo's default)")
                filled.append(f"step_scheduler.{key}={'none' if value is None else value}")
        if filled:
            self.loaded.filled.append(f"NeMo Automodel's defaults for step_scheduler keys the YAML leaves out: {', '.join(filled)}")

    def inherit_validation_fields(self) -> None:
        """A validation value equal to the train section's becomes "inherit" (None): the seed's YAML
        repeats its paths in both sections, and `--config.dataset.paths=...` must then move both."""
        from jaxpretrain.config.sections import INHERITED_VALIDATION_FIELDS

        cfg = self.loaded.cfg
        for name in INHERITED_VALIDATION_FIELDS:
            if name in cfg.validation_dataset and cfg.validation_dataset[name] == cfg.dataset[name]:
                self.set(f"validation_dataset.{name}", None, f"validation_dataset.{name}")

    def model_source(self, model: dict) -> tuple[str, bool, dict]:
        targets = TARGETS["model"]
        target = self.target("model", model, "model", targets)
        load_weights = bool(targets.get(target, False))
        known = {"_target_", "config", "pretrained_model_name_or_path", "is_meta_device", "torch_dtype"}
        for k in model:
            if k not in known:
                raise self.error(f"model.{k}", f"not supported (supported: {', '.join(sorted(known))})")
        if model.get("is_meta_device") is not None:
            self.notes.append("model.is_meta_device (models are always built sharded, nothing is materialised whole)")
        if model.get("torch_dtype") is not None:
            self.notes.append("model.torch_dtype (master weights stay float32; model.dtype sets the compute dtype)")
        config = model.get("config") or {}
        if not isinstance(config, dict):
            raise self.error("model.config", "a mapping is expected")
        self.target("model.config", config, "model.config", TARGETS["model.config"])
        kwargs = {k: v for k, v in config.items() if k not in ("_target_", "pretrained_model_name_or_path")}
        name = config.get("pretrained_model_name_or_path") or model.get("pretrained_model_name_or_path")
        if not name:
            raise self.error("model.config.pretrained_model_name_or_path", "missing (an HF directory, config.json, or 'gpt2')")
        return str(name), load_weights, kwargs

    def base_for(self, name: str) -> Loaded:
        from jaxpretrain.model.registry import family_of

        family = family_of(name)
        config_file = os.path.join(REPO_ROOT, "configs", f"{family.name}.py")
        if not os.path.isfile(config_file):
            raise self.error("model", f"no config file {config_file} for the {family.name} family")
        return load_python(config_file, None)

    def section(self, section: str, node: dict) -> None:
        fields = FIELDS[section]
        if section in TARGETS or section == "validation_dataloader":
            self.target(section, node, section, TARGETS.get(section, TARGETS["dataloader"]))
        if section == "optimizer":
            node = {**TORCH_ADAMW_DEFAULTS, **node}
            if node.get("amsgrad"):
                raise self.error("optimizer.amsgrad", "AMSGrad is not supported (AdamW as torch computes it without it)")
            node.pop("amsgrad", None)
        if section == "lr_scheduler":
            node = self.resume_policy(node)
        if section == "step_scheduler" and isinstance(node.get("preemption_signal"), (list, int)):
            value = node["preemption_signal"]  # a list or a number in NeMo's YAML; one string here
            node = {**node, "preemption_signal": ",".join(map(str, value if isinstance(value, list) else [value]))}
        if section == "wandb":
            node = self.wandb(node)
        if section == "checkpoint":
            fmt = node.get("model_save_format")
            if fmt not in (None, "torch_save", "safetensors"):
                raise self.error("checkpoint.model_save_format", f"{fmt!r} is not torch_save or safetensors")
            if node.get("save_consolidated") and fmt == "torch_save":
                raise self.error("checkpoint.save_consolidated", "requires model_save_format: safetensors (as in NeMo Automodel)")
        has_target = section in TARGETS or section == "validation_dataloader"
        for key, value in node.items():
            if key == "_target_" and has_target:
                continue
            if key not in fields:
                supported = ", ".join(k for k in fields) or "only _target_"
                raise self.error(f"{section}.{key}", f"not supported (supported: {supported})")
            if fields[key] is None:
                self.notes.append(f"{section}.{key}")
            else:
                self.set(fields[key], value, f"{section}.{key}")

    def wandb(self, node: dict) -> dict:
        """NeMo logs to W&B whenever the YAML has a `wandb` block (project "automodel" if it names
        none), unless `enable: false`."""
        if node.get("enable", True) is False:
            return {}
        if node.get("enable", True) is not True:
            raise self.error("wandb.enable", f"{node['enable']!r} is not true or false")
        node = {k: v for k, v in node.items() if k != "enable"}
        if not node.get("project"):
            node["project"] = NEMO_WANDB_PROJECT
            self.loaded.filled.append(f"NeMo Automodel's default W&B project for a wandb block without one: wandb.project={NEMO_WANDB_PROJECT}")
        return node

    def resume_policy(self, node: dict) -> dict:
        """NeMo's two resume flags. A resumed run here always follows the config's schedule (and logs
        what changed since the checkpoint): NeMo's `override_opt_param_scheduler: true` with
        `use_checkpoint_opt_param_scheduler: false`, the one combination accepted besides neither."""
        node = dict(node)
        flags = {k: node.pop(k) for k in ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler") if k in node}
        if flags and flags != {"override_opt_param_scheduler": True, "use_checkpoint_opt_param_scheduler": False}:
            raise self.error(
                f"lr_scheduler.{next(iter(flags))}", "only override_opt_param_scheduler: true with use_checkpoint_opt_param_scheduler: "
                "false is supported (a resumed run follows the config's schedule and logs what changed since the checkpoint)"
            )
        return node

    def dataset(self, section: str, node: dict) -> None:
        self.target(section, node, section, TARGETS["dataset"])
        want = "train" if section == "dataset" else "validation"
        split = node.get("splits_to_build", want)
        if split != want:
            raise self.error(f"{section}.splits_to_build", f"{split!r}: this section builds {want!r}")
        for key, value in node.items():
            if key in ("_target_", "splits_to_build"):
                continue
            if key == "tokenizer":
                self.set(f"{section}.tokenizer", self.tokenizer(section, value), f"{section}.tokenizer")
            elif key == "num_val_samples" and section == "validation_dataset":
                self.set("validation_dataset.num_val_samples", value, f"{section}.{key}")
            elif key == "num_train_samples" and section == "dataset":
                self.set("dataset.num_train_samples", value, f"{section}.{key}")
            elif key in DATASET_FIELDS:
                if DATASET_FIELDS[key] is None:
                    self.notes.append(f"{section}.{key}")
                else:
                    self.set(f"{section}.{DATASET_FIELDS[key]}", value, f"{section}.{key}")
            else:
                supported = ", ".join(["paths", "index_mapping_dir", "tokenizer", "seq_length", "split", "splits_to_build", "seed",
                                       "num_val_samples" if section == "validation_dataset" else "num_train_samples"])
                raise self.error(f"{section}.{key}", f"not supported (supported: {supported})")

    def tokenizer(self, section: str, value) -> str:
        if isinstance(value, str):
            return value
        if not isinstance(value, dict):
            raise self.error(f"{section}.tokenizer", "a name, a directory, or {_target_, pretrained_model_name_or_path} is expected")
        self.target(f"{section}.tokenizer", value, f"{section}.tokenizer", TARGETS["tokenizer"])
        extra = [k for k in value if k not in ("_target_", "pretrained_model_name_or_path")]
        if extra:
            raise self.error(f"{section}.tokenizer.{extra[0]}", "not supported (supported: pretrained_model_name_or_path)")
        name = value.get("pretrained_model_name_or_path")
        if not name:
            raise self.error(f"{section}.tokenizer.pretrained_model_name_or_path", "missing")
        return str(name)
