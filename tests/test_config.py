"""The config layer: presets, NeMo's recipe YAML as is, overrides (JSON lists and dicts), `--help`,
and the effective config a run writes, which `--config` takes back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from jaxpretrain.config import cli, finalize
from jaxpretrain.config.overrides import leaf_paths, plain
from jaxpretrain.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_YAML = os.path.join(ROOT, "configs", "megatron_pretrain_gpt2.yaml")  # verbatim from the seed document


def parse(*argv):
    parsed = cli.parse(list(argv), prog="python -m jaxpretrain.train", description="")
    finalize(parsed.cfg)
    return parsed


def seed_yaml_with_paths(tmp_path, paths: str, mapping_dir: str) -> str:
    """The seed's YAML with only its two `# REPLACE THIS` values replaced, as the guide tells users."""
    text = open(SEED_YAML).read()
    assert text.count("# REPLACE THIS") == 4
    text = re.sub(r"paths: \S+  # REPLACE THIS", f"paths: {paths}  # REPLACE THIS", text)
    text = re.sub(r"index_mapping_dir: \S+  # REPLACE THIS", f"index_mapping_dir: {mapping_dir}  # REPLACE THIS", text)
    out = tmp_path / "megatron_pretrain_gpt2.yaml"
    out.write_text(text)
    return str(out)


def test_seed_yaml_is_the_124m_preset_field_for_field():
    yaml_cfg = plain(parse("--config", SEED_YAML).cfg)
    preset = plain(parse("--config", "configs/gpt2.py:124m").cfg)
    assert yaml_cfg == preset
    # And the values are the seed's (not just equal to each other).
    assert preset["step_scheduler"] == {
        "global_batch_size": 512, "local_batch_size": 32, "ckpt_every_steps": 1000, "save_checkpoint_every_epoch": True,
        "val_every_steps": 250,
        "validate_on_checkpoint": True, "num_epochs": 1, "max_steps": 18500, "preemption_signal": "SIGTERM",
        "log_remote_every_steps": 1,  # NeMo's default (the seed leaves it out)
    }
    assert (preset["optimizer"]["lr"], preset["optimizer"]["betas"], preset["optimizer"]["weight_decay"]) == (6e-4, [0.9, 0.95], 0.1)
    assert (preset["lr_scheduler"]["lr_warmup_steps"], preset["rng"]["seed"]) == (700, 1111)
    assert preset["validation_dataset"]["num_val_samples"] == 1024 and preset["distributed"]["dp_size"] is None


def test_yaml_overrides_and_torch_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "model:\n  config:\n    pretrained_model_name_or_path: gpt2\n    n_layer: 3\n"
        "optimizer:\n  _target_: torch.optim.AdamW\n  lr: 0.001\n"
        "dataloader:\n  num_workers: 2\n"
    )
    # The YAML leaves out max_steps: NeMo's full-epoch training (none), unless the command line gives it.
    loaded = parse("--config", str(p))
    assert loaded.cfg.step_scheduler.max_steps is None and "step_scheduler.max_steps=none" in " ".join(loaded.loaded.filled)
    loaded = parse("--config", str(p), "--config.optimizer.lr=2e-3", "--config.model.n_embd=64",
                   "--config.step_scheduler.max_steps=40")
    cfg = loaded.cfg
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.optimizer.lr, cfg.step_scheduler.max_steps) == (3, 64, 2e-3, 40)
    assert "max_steps" not in " ".join(loaded.loaded.filled)  # the command line's value is no filled-in default
    # NeMo's preemption_signal may be a list (or a number) in the YAML: one comma-separated field here.
    p.write_text(p.read_text() + "step_scheduler:\n  max_steps: 10\n  preemption_signal: [SIGUSR1, 15]\n")
    from jaxpretrain.train.preemption import parse_signals

    assert [s.name for s in parse_signals(parse("--config", str(p)).cfg.step_scheduler.preemption_signal)] == ["SIGUSR1", "SIGTERM"]
    # Arguments torch.optim.AdamW leaves to its defaults take torch's defaults, as in NeMo.
    assert (tuple(cfg.optimizer.betas), cfg.optimizer.weight_decay) == ((0.9, 0.999), 0.01)
    assert cfg.dataset.worker_count == 2


@pytest.mark.parametrize(
    "yaml_text,expected",
    [
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\noptimizer:\n  _target_: torch.optim.SGD\n",
         "optimizer._target_: 'torch.optim.SGD' is not supported (supported: torch.optim.AdamW)"),
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\npeft:\n  dim: 8\n", "peft: section not supported"),
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\nstep_scheduler:\n  max_step: 5\n",
         "step_scheduler.max_step: not supported (supported: global_batch_size"),
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\n    n_layers: 5\n", "model.config.n_layers: not a model field"),
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\ndataset:\n  splits_to_build: validation\n",
         "dataset.splits_to_build: 'validation': this section builds 'train'"),
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\nlr_scheduler:\n  use_checkpoint_opt_param_scheduler: true\n",
         "lr_scheduler.use_checkpoint_opt_param_scheduler: only override_opt_param_scheduler: true with use_checkpoint_opt_param_scheduler: false"),
        ("model:\n  config:\n    pretrained_model_name_or_path: gpt2\nlr_scheduler:\n  lr_decay_style: WSD\n  wsd_decay_step: 5\n",
         "lr_scheduler.wsd_decay_step: not supported (supported: lr_decay_style, lr_warmup_steps"),
        ("model: [1\n", "not valid YAML"),
    ],
)
def test_yaml_mistakes_name_the_key(tmp_path, yaml_text, expected):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(UserError, match=re.escape(expected)):
        parse("--config", str(p))


def test_overrides_are_typed_and_json_lists_and_dicts_parse():
    blend = '["30", "a/p_0_text_document", "70", "a/p_1_text_document"]'
    split = '{"train": ["a/p_0_text_document"], "validation": ["a/p_1_text_document"]}'
    cfg = parse(
        "--config", "configs/gpt2.py:tiny", f"--config.dataset.paths={blend}", "--config.validation_dataset.paths", split,
        "--config.optimizer.betas=0.8,0.9", "--config.distributed.dp_size=none", "--config.checkpoint.async_save=false",
        "--config.optimizer.lr=1",
    ).cfg
    assert plain(cfg.dataset.paths) == ["30", "a/p_0_text_document", "70", "a/p_1_text_document"]
    assert plain(cfg.validation_dataset.paths) == {"train": ["a/p_0_text_document"], "validation": ["a/p_1_text_document"]}
    assert tuple(cfg.optimizer.betas) == (0.8, 0.9) and cfg.distributed.dp_size is None
    assert cfg.checkpoint.async_save is False and cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


# NeMo's command-line overrides of a recipe YAML, each of its forms: `--key VALUE`, `--key=VALUE`, a
# bare `--key` (true), nested keys, Python literals (a list, none, a float), a key the file lacks.
NEMO_FLAGS = [
    "--step_scheduler.max_steps", "7", "--model.config.n_layer=3", "--clip_grad_norm.max_norm", "0.5",
    "--optimizer.lr=1e-4", "--optimizer.betas", "[0.9, 0.99]", "--checkpoint.enabled", "false",
    "--dataset.tokenizer.pretrained_model_name_or_path", "gpt2", "--step_scheduler.val_every_steps", "none",
    "--checkpoint.save_consolidated", "--checkpoint.model_save_format", "safetensors", "--dataloader.num_workers=2",
    "--dataset.paths", "['30', 'a/p_0_text_document', '70', 'a/p_1_text_document']",
]


def test_nemo_style_flags_set_the_yaml_as_nemos_own_parser_does(monkeypatch):
    """NeMo's `parse_args_and_load_config` applies the flags to the seed's YAML; ours, applied to the
    same YAML, must give the same mapping (both read through NeMo's ConfigNode); and the config our
    command line builds from them holds the flags' values."""
    pytest.importorskip("nemo_automodel")
    import yaml
    from nemo_automodel.components.config import _arg_parser, loader

    from jaxpretrain.config import nemo_yaml

    # NeMo imports each `_target_` as it loads (torch, torchao...): keep them the strings they are.
    monkeypatch.setattr(loader, "_resolve_target", lambda target: target)
    theirs = _arg_parser.parse_args_and_load_config(argv=["--config", SEED_YAML, *NEMO_FLAGS]).to_dict()
    _, overrides = _arg_parser.parse_cli_argv(argv=["--config", SEED_YAML, *NEMO_FLAGS])
    with open(SEED_YAML) as f:
        data = yaml.safe_load(f)
    nemo_yaml.apply(data, tuple(("--" + kv.split("=", 1)[0], kv.split("=", 1)[1]) for kv in overrides))
    assert loader.ConfigNode(data).to_dict() == theirs

    ours = parse("-c", SEED_YAML, *NEMO_FLAGS).cfg
    assert (ours.step_scheduler.max_steps, ours.model.n_layer, ours.optimizer.max_grad_norm, ours.optimizer.lr) == (7, 3, 0.5, 1e-4)
    assert (tuple(ours.optimizer.betas), ours.checkpoint.enabled, ours.checkpoint.save_consolidated) == ((0.9, 0.99), False, True)
    assert (ours.dataset.tokenizer, ours.step_scheduler.val_every_steps, ours.dataset.worker_count) == ("gpt2", None, 2)
    assert plain(ours.dataset.paths) == ["30", "a/p_0_text_document", "70", "a/p_1_text_document"]


ENV_STRINGS = ["${DATA}/p_0", "${oc.env:DATA}/x", "${UNSET_VAR,fallback}/y", "$DATA.dir/z", "${ DATA }", "plain", "a$DATA$DATA"]


def test_environment_references_resolve_as_nemos(monkeypatch, tmp_path):
    pytest.importorskip("nemo_automodel")
    from nemo_automodel.components.config.loader import resolve_yaml_env_vars

    from jaxpretrain.config.nemo_yaml import Where, resolve_env

    monkeypatch.setenv("DATA", "/data/fineweb")
    monkeypatch.setenv("DATA.dir", "/data/dotted")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    where = Where("r.yaml", {}, ())
    assert [resolve_env(v, where) for v in ENV_STRINGS] == [resolve_yaml_env_vars(v) for v in ENV_STRINGS]
    # In a recipe: the paths come from the environment; an unset variable is one line naming the key.
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  config:\n    pretrained_model_name_or_path: gpt2\n"
                 "dataset:\n  paths: ${DATA}/processed_data_0_text_document\n  index_mapping_dir: ${MAPS,/tmp/maps}\n")
    cfg = parse("--config", str(p)).cfg
    assert (cfg.dataset.paths, cfg.dataset.index_mapping_dir) == ("/data/fineweb/processed_data_0_text_document", "/tmp/maps")
    with pytest.raises(UserError) as e:
        parse("--config", str(p), "--dataset.seq_length", "$UNSET_VAR")
    assert str(e.value) == "--dataset.seq_length: environment variable UNSET_VAR is not set (needed by $UNSET_VAR)"


@pytest.mark.parametrize("config, flags, expected", [
    (SEED_YAML, ["--step_scheduler.max_stepz", "7"], "--step_scheduler.max_stepz: not supported (supported: global_batch_size"),
    (SEED_YAML, ["--peft.dim", "8"], "--peft.dim: section not supported"),
    (SEED_YAML, ["--model.config.n_layers=3"], "--model.config.n_layers: not a model field"),
    (SEED_YAML, ["--optimizer.lr", "fast"], "--optimizer.lr: 'fast' is not a number"),
    ("configs/gpt2.py:tiny", ["--step_scheduler.max_stepz", "7"], "--step_scheduler.max_stepz: no such config field"),
])
def test_nemo_style_flag_mistakes_name_the_flag(config, flags, expected):
    with pytest.raises(UserError) as e:
        parse("--config", config, *flags)
    assert expected in str(e.value)


def test_nemo_style_flags_of_a_python_config_are_its_fields():
    cfg = parse("--config", "configs/gpt2.py:tiny", "--step_scheduler.max_steps", "7", "--model.n_layer=3",
                "--config.model.n_layer=4").cfg
    assert (cfg.step_scheduler.max_steps, cfg.model.n_layer) == (7, 4)  # --config.* apply last


@pytest.mark.parametrize("block, expected", [
    # NeMo's WandbConfig: a block turns W&B on, project "automodel" unless named; enable: false turns it off.
    ("wandb:\n  name: run1\n", {"project": "automodel", "name": "run1"}),
    ("wandb:\n  project: p\n  enable: false\n", {"project": None}),
    ("wandb:\n  project: p\n  group: g\n  tags: [a, b]\n  notes: n\n  mode: offline\n  dir: /tmp/w\n",
     {"project": "p", "group": "g", "tags": ("a", "b"), "notes": "n", "mode": "offline", "save_dir": "/tmp/w"}),
    ("", {"project": None}),
])
def test_a_wandb_block_turns_wandb_on_as_in_nemo(tmp_path, block, expected):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  config:\n    pretrained_model_name_or_path: gpt2\n" + block)
    loaded = parse("--config", str(p))
    assert {k: (tuple(v) if k == "tags" else v) for k, v in plain(loaded.cfg.wandb).items() if k in expected} == expected
    assert ("wandb.project=automodel" in " ".join(loaded.loaded.filled)) == (expected.get("project") == "automodel")


def test_validation_fields_default_to_the_train_section():
    cfg = parse("--config", "configs/gpt2.py:tiny", "--config.dataset.paths=other/*", "--config.dataset.seq_length=64").cfg
    v = cfg.validation_dataset
    assert (v.paths, v.index_mapping_dir, v.seq_length, v.split) == ("other/*", cfg.dataset.index_mapping_dir, 64, cfg.dataset.split)
    cfg = parse("--config", "configs/gpt2.py:tiny", "--config.validation_dataset.paths=val/*").cfg
    assert cfg.validation_dataset.paths == "val/*" and cfg.dataset.paths != "val/*"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--config.step_scheduler.max_step=5"], "--config.step_scheduler.max_step: no such config field step_scheduler.max_step; did you mean --config.step_scheduler.max_steps?"),
        (["--config.model.seq_length=5"], "did you mean --config.dataset.seq_length?"),
        (["--config.step_scheduler.max_steps=many"], "--config.step_scheduler.max_steps: 'many' is not a whole number"),
        (["--config.dataset.paths=[1, 2"], "--config.dataset.paths: '[1, 2' is not valid JSON"),
        (["--steps=3"], "--steps=3: unknown flag"),
        (["--config.optimizer.lr", "--config.step_scheduler.max_steps=3"],
         "--config.optimizer.lr: no value given (write --config.optimizer.lr=VALUE; the next flag, --config.step_scheduler.max_steps, is not a value)"),
    ],
)
def test_override_mistakes(argv, expected):
    with pytest.raises(UserError) as e:
        parse("--config", "configs/gpt2.py:tiny", *argv)
    assert expected in str(e.value) and "\\'" not in str(e.value)


def test_help_lists_every_field_with_its_default_without_importing_jax():
    code = (
        "import sys\n"
        "from jaxpretrain.train.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'jax' not in sys.modules and 'transformers' not in sys.modules, 'help imported jax/transformers'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = cli.parse(["--config", "configs/gpt2.py"], prog="", description="").cfg  # as the file defines it
    for path in leaf_paths(cfg):
        *parents, name = path.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        line = f"{path} = {cli._show(node[name])}"
        assert line in r.stdout, line
    assert "124m" in r.stdout and "tiny" in r.stdout  # the presets
    # Each field's comment from the config file follows it.
    assert "Tokens per sample (the model sees seq_length inputs" in r.stdout
    assert "GPT-2 shape overrides on top of that config" in r.stdout


def test_every_cli_answers_help_fast():
    for module in ("train", "bench", "export", "generate", "preprocess"):
        code = (
            "import runpy, sys\n"
            f"sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_module('jaxpretrain.{module}', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'jax' not in sys.modules, 'imported jax before printing help'\n"
        )
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stdout[-500:], r.stderr[-2000:])


def test_the_jaxpretrain_command_runs_every_cli_by_name():
    """`python -m jaxpretrain COMMAND` (the `jaxpretrain` console script) is each CLI: its help is
    the module's own, word for word."""
    from jaxpretrain.__main__ import COMMANDS

    def run(*args, stdout=subprocess.PIPE):
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)

    listing = run("jaxpretrain", "--help")
    assert listing.returncode == 0 and all(f"  {name} " in listing.stdout for name in COMMANDS), listing.stdout
    for name, (module, _) in COMMANDS.items():
        ours, theirs = run("jaxpretrain", name, "--help"), run(module.removesuffix(".__main__"), "--help")
        assert (ours.returncode, ours.stdout) == (0, theirs.stdout) and "usage:" in ours.stdout, (name, ours.stderr[-2000:])
    wrong = run("jaxpretrain", "trian")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: trian: unknown command (commands: train, ")
    assert len(wrong.stderr.splitlines()) == 1
    # A reader that went away (`jaxpretrain train --help | head -1`): status 141, no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    gone = run("jaxpretrain", "train", "--help", stdout=write_end)
    os.close(write_end)
    assert (gone.returncode, gone.stderr) == (141, "")


def test_a_llama_recipe_yaml_takes_its_shape_from_its_hf_config(tmp_path):
    """A recipe YAML naming an HF config: the family's default preset (Llama 1B) gives the other
    sections, but its shape fields do not override that config; the YAML's own kwargs do."""
    import json

    hf = tmp_path / "small_llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 128,
    }))
    p = tmp_path / "llama.yaml"
    p.write_text(f"model:\n  config:\n    pretrained_model_name_or_path: {hf}\n    num_hidden_layers: 3\n"
                 "step_scheduler:\n  max_steps: 100\n")
    cfg = parse("--config", str(p)).cfg
    assert cfg.model.pretrained_model_name_or_path == str(hf)
    assert cfg.model.num_hidden_layers == 3 and cfg.model.hidden_size is None and cfg.model.vocab_size is None
    import jaxpretrain.model as M
    from jaxpretrain.train.setup import model_config

    with cfg.unlocked():
        cfg.dataset.seq_length = 128
        cfg.validation_dataset.seq_length = 128
    c = model_config(cfg)
    assert (type(c).__name__, c.hidden_size, c.num_hidden_layers, c.vocab_size) == ("LlamaConfig", 64, 3, 1000)
    assert M.family_of(c).name == "llama"
