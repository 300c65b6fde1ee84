"""What a user sees when running the seed's YAML, JSON blends on the command line, and every natural
mistake: each mistake is one `error:` line naming the field or file, exit status 2, no traceback, and
nothing written."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from test_config import seed_yaml_with_paths
from test_train import STEP_LINE, VAL_LINE, as_flags, python, tiny_overrides

SMALL = [
    "--config.model.n_layer=2", "--config.model.n_embd=64", "--config.model.n_head=4", "--config.model.n_positions=64",
    "--config.model.dtype=float32", "--config.model.dropout=0.0", "--config.dataset.seq_length=32",
    "--config.dataset.split=0.9,0.1,0.0", "--config.step_scheduler.global_batch_size=8",
    "--config.step_scheduler.local_batch_size=4", "--config.step_scheduler.max_steps=4",
    "--config.step_scheduler.val_every_steps=2", "--config.step_scheduler.ckpt_every_steps=4",
    "--config.validation_dataset.num_val_samples=8", "--config.lr_scheduler.lr_warmup_steps=1",
]


def one_error_line(r, expected: str, exit_code: int = 2):
    assert r.returncode == exit_code, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert expected in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def yaml_run(token_glob, tmp_path_factory):
    """The seed's YAML (paths replaced) trains a few steps with small-shape overrides."""
    tmp = tmp_path_factory.mktemp("yaml")
    recipe = seed_yaml_with_paths(tmp, token_glob, str(tmp / "mapping_dir"))
    ckpt = str(tmp / "checkpoints")
    r = python("-m", "jaxpretrain.train", "--config", recipe, *SMALL, f"--config.checkpoint.checkpoint_dir={ckpt}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return recipe, ckpt, r


def test_seed_yaml_trains_and_reports(yaml_run):
    recipe, ckpt, r = yaml_run
    assert [int(m.group(1)) for m in map(STEP_LINE.search, r.stdout.splitlines()) if m] == [1, 2, 3, 4]
    assert [int(m.group(1)) for m in map(VAL_LINE.search, r.stdout.splitlines()) if m] == [2, 4]
    # One note for the keys that do not apply to JAX.
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "dist_env.backend" in notes[0] and "dataloader.collate_fn" in notes[0]
    # What a person wants to see: where things go, each checkpoint, and a summary at the end.
    out = r.stdout
    assert f"Checkpoint saved: step 4 -> {ckpt}/4" in out
    assert "Logs: " in out and "TensorBoard" in out and "Validation data: the same files" in out
    assert "Summary: Finished at step 4 of 4" in out and "val loss" in out
    assert f"python -m jaxpretrain.export --checkpoint-dir {ckpt}" in out
    assert "Recipe config:" not in out  # the full config goes to the run directory instead
    # The effective config: every field, and --config takes it back to the same config.
    from jaxpretrain.config import cli, finalize
    from jaxpretrain.config.overrides import plain

    effective = os.path.join(ckpt, "logs", "config.yaml")
    again = cli.parse(["--config", effective], prog="", description="")
    direct = cli.parse(["--config", recipe, *SMALL, f"--config.checkpoint.checkpoint_dir={ckpt}"], prog="", description="")
    assert plain(finalize(again.cfg)) == plain(finalize(direct.cfg))


def test_json_list_and_dict_on_the_command_line_train(corpus, tmp_path):
    prefixes = sorted({p[: -len(".bin")] for p in __import__("glob").glob(corpus.glob) if p.endswith(".bin")})
    assert len(prefixes) == 2
    blend = json.dumps(["30", prefixes[0], "70", prefixes[1]])
    per_split = json.dumps({"validation": [prefixes[1]]})
    o = tiny_overrides(corpus, str(tmp_path / "ckpt"), **{"step_scheduler.max_steps": 2, "step_scheduler.val_every_steps": 2, "lr_scheduler.lr_warmup_steps": 1})
    del o["dataset.paths"], o["validation_dataset.paths"]
    r = python("-m", "jaxpretrain.train", *as_flags(o), f"--config.dataset.paths={blend}", f"--config.validation_dataset.paths={per_split}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Train data: 2 file(s)" in r.stdout and "Validation data: 1 file(s)" in r.stdout
    assert [int(m.group(1)) for m in map(VAL_LINE.search, r.stdout.splitlines()) if m] == [2]


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--config.lr_scheduler.lr_warmup_steps=50", "--config.step_scheduler.max_steps=40"],
         "lr_scheduler.lr_warmup_steps: 50 is not below the decay steps (40"),
        (["--config.lr_scheduler.lr_decay_style=cosin"], "lr_scheduler.lr_decay_style: 'cosin' is not one of cosine, linear"),
        (["--config.lr_scheduler.lr_decay_style=WSD", "--config.lr_scheduler.wsd_decay_steps=5"],
         "lr_scheduler.lr_wsd_decay_style: None is not one of linear, cosine, exponential, minus_sqrt"),
        (["--config.lr_scheduler.wd_incr_style=linear", "--config.lr_scheduler.start_wd=0.5"],
         "lr_scheduler.start_wd: 0.5 is not between 0 and end_wd (0.1"),
        (["--config.step_scheduler.max_step=5"],
         "no such config field step_scheduler.max_step; did you mean --config.step_scheduler.max_steps?"),
        (["--config.optimizer.name=sgd"], "optimizer.name: 'sgd' is not supported"),
        (["--config.optimizer.betas=0.9"], "optimizer.betas: expected two numbers [beta1, beta2]"),
        (["--config.optimizer.betas=[0.9, 1.5]"], "optimizer.betas: beta2 must be a number in [0, 1), got 1.5"),
        (["--config.optimizer.eps=-1"], "optimizer.eps: must be positive"),
        (["--config.optimizer.lr=-1"], "optimizer.lr: must be positive"),  # not lr_scheduler.min_lr
        (["--config.model.dtype=float8"], "model.dtype: 'float8' is not one of float32, bfloat16, float16"),
        (["--config.model.dropout=1.5"], "model.dropout: embd_pdrop must be in [0, 1), got 1.5"),
        (["--config.step_scheduler.global_batch_size=0"], "step_scheduler.global_batch_size: must be positive, got 0"),
        (["--config.step_scheduler.max_steps=0"], "step_scheduler.max_steps: must be a positive number of steps (none: num_epochs whole epochs), got 0"),
        (["--config.step_scheduler.num_epochs=0"], "step_scheduler.num_epochs: must be a positive number of passes over the train split, got 0"),
        (["--config.step_scheduler.log_remote_every_steps=0"], "step_scheduler.log_remote_every_steps: must be a positive number of steps, got 0"),
        (["--config.wandb.mode=cloud"], "wandb.mode: 'cloud' is not one of online, offline, disabled, shared"),
        (["--config.checkpoint.enabled=false", "--config.checkpoint.restore_from=runs/a/checkpoints/6"],
         "checkpoint.restore_from: runs/a/checkpoints/6 is set but checkpoint.enabled is false"),
        (["--config.step_scheduler.ckpt_every_steps=0"], "step_scheduler.ckpt_every_steps: must be a positive number of steps, got 0"),
        (["--config.step_scheduler.val_every_steps=-5"], "step_scheduler.val_every_steps: must be a number of steps (0: never"),
        (["--config.step_scheduler.preemption_signal=SIGTERM,USR3"], "step_scheduler.preemption_signal: 'USR3' is not a signal"),
        (["--config.checkpoint.checkpoint_dir=/etc/passwd"], "checkpoint.checkpoint_dir: /etc/passwd exists and is not a directory"),
        (["--config.checkpoint.checkpoint_dir=/etc/passwd/ckpt"], "/etc/passwd/ckpt cannot be created (/etc/passwd is a file)"),
        (["--config.validation_dataset.split=abc"], "validation_dataset.split: 'abc' must be one to three numbers"),
        (["--config.dataset.tokenizer=/nonexistent/tok"], "dataset.tokenizer: tokenizer '/nonexistent/tok': cannot load"),
        pytest.param(
            ["--config.wandb.project=demo"], "wandb.project: 'demo' is set but the wandb package is not installed",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here"),
        ),
    ],
)
def test_config_mistakes(flags, expected, corpus, tmp_path):
    o = tiny_overrides(corpus, str(tmp_path / "ckpt"))
    r = python("-m", "jaxpretrain.train", *as_flags(o), *flags, timeout=300)
    one_error_line(r, expected)
    assert not os.path.exists(tmp_path / "ckpt")


def test_missing_config_file_and_unknown_preset():
    one_error_line(python("-m", "jaxpretrain.train", "--config", "configs/nope.py"), "--config configs/nope.py: no such config file")
    line = one_error_line(python("-m", "jaxpretrain.train", "--config", "configs/gpt2.py:huge"), "unknown preset 'huge'")
    assert "124m" in line and "tiny" in line
    one_error_line(python("-m", "jaxpretrain.train", "--config", "missing.yaml"), "--config missing.yaml: no such config file")


def test_resume_with_another_model_shape_names_the_field(yaml_run):
    recipe, ckpt, _ = yaml_run
    flags = [f for f in SMALL if "n_layer" not in f] + ["--config.model.n_layer=3", f"--config.checkpoint.checkpoint_dir={ckpt}"]
    r = python("-m", "jaxpretrain.train", "--config", recipe, *flags)
    line = one_error_line(r, "model.n_layer: the checkpoint at")
    assert "n_layer=2" in line and "this config 3" in line and "checkpoint.checkpoint_dir" in line
    assert "Datasets:" not in r.stdout  # failed before any data work


def test_preprocess_without_the_key_lists_keys_and_writes_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"content": f"doc {i}", "url": "u"}) for i in range(5)) + "\n")
    out = tmp_path / "out"
    r = python("-m", "jaxpretrain.preprocess", "--input", str(src), "--json-keys", "text", "--output-prefix", "p",
               "--output-path", str(out), "--workers", "1")
    line = one_error_line(r, "no row has the key 'text'")
    assert "'content'" in line and "'url'" in line and str(src) in line
    assert not out.exists() or os.listdir(out) == []


def test_export_of_a_step_directory_says_use_step(yaml_run, tmp_path):
    _, ckpt, _ = yaml_run
    r = python("-m", "jaxpretrain.export", "--checkpoint-dir", os.path.join(ckpt, "4"), "--output", str(tmp_path / "hf"))
    line = one_error_line(r, "is one checkpoint (step 4)")
    assert f"--checkpoint-dir {ckpt} --step 4" in line
    assert not (tmp_path / "hf").exists()
    r = python("-m", "jaxpretrain.export", "--checkpoint-dir", ckpt, "--step", "3", "--output", str(tmp_path / "hf"))
    assert "--step: 3 is not among the checkpoints" in one_error_line(r, "--step")
    assert not (tmp_path / "hf").exists()


def test_damaged_checkpoint_is_one_line_naming_it(yaml_run, tmp_path):
    """A checkpoint whose params item is gone, or whose files are cut short: export, and a run resuming
    from it, say which checkpoint is damaged and what is left, in one line (Orbax raised KeyError /
    JSONDecodeError tracebacks)."""
    import shutil

    recipe, ckpt, _ = yaml_run
    steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
    newest = steps[-1]
    for damage in ("missing", "truncated"):
        copy = tmp_path / damage
        shutil.copytree(ckpt, copy)
        params = copy / str(newest) / "params"
        if damage == "missing":
            shutil.rmtree(params)
        else:
            for root, _, files in os.walk(params):
                for name in files:
                    with open(os.path.join(root, name), "r+b") as f:
                        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
        r = python("-m", "jaxpretrain.export", "--checkpoint-dir", str(copy), "--output", str(tmp_path / "hf"))
        line = one_error_line(r, f"{copy / str(newest)}: this checkpoint is damaged and cannot be restored")
        assert (f"older checkpoints: {', '.join(map(str, steps[:-1]))}" if steps[:-1] else "no older checkpoint") in line
        assert not (tmp_path / "hf").exists()
    r = python("-m", "jaxpretrain.train", "--config", recipe, *SMALL, f"--config.checkpoint.checkpoint_dir={tmp_path / 'missing'}")
    one_error_line(r, f"{tmp_path / 'missing' / str(newest)}: this checkpoint is damaged")


def test_export_never_replaces_a_directory_that_is_not_a_model(yaml_run, tmp_path):
    """An existing --output is replaced only when it is an earlier export; a directory with the user's
    files, the checkpoint directory itself or one holding it, or a file, is refused untouched."""
    _, ckpt, _ = yaml_run
    export = lambda out: python("-m", "jaxpretrain.export", "--checkpoint-dir", ckpt, "--output", str(out))
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    line = one_error_line(export(work), "exists and is not a model directory (notes.txt)")
    assert str(work) in line and (work / "notes.txt").read_text() == "mine"
    steps_before = sorted(os.listdir(ckpt))
    one_error_line(export(ckpt), "is the checkpoint directory or holds it")
    one_error_line(export(os.path.dirname(ckpt)), "is the checkpoint directory or holds it")
    assert sorted(os.listdir(ckpt)) == steps_before
    (tmp_path / "file").write_text("x")
    one_error_line(export(tmp_path / "file"), "exists and is not a directory")
    # An earlier export is replaced (the rerun of the same command).
    hf = tmp_path / "hf"
    assert export(hf).returncode == 0 and export(hf).returncode == 0
    assert {"config.json", "model.safetensors"} <= set(os.listdir(hf))
    # Modes as plain open()/mkdir() give them (safetensors and temp names alone would be 0600/0700).
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(hf).st_mode & 0o777 == 0o777 & ~umask
    assert {f: os.stat(hf / f).st_mode & 0o777 for f in os.listdir(hf)} == {f: 0o666 & ~umask for f in os.listdir(hf)}
