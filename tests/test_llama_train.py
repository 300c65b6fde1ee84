"""`configs/llama.py:tiny` end to end on CPU, with real processes (test_train.py's helpers): preprocess ->
train -> validate -> checkpoint -> export -> transformers' LlamaForCausalLM; SIGTERM and resume;
generation from the checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_train import ROOT, SEQ, STEP_LINE, VAL_LINE, python, train_losses

STEPS = 12
VAL_SAMPLES = 16


def llama_overrides(token_glob: str, ckpt_dir: str) -> dict:
    cache = os.path.join(os.path.dirname(ckpt_dir), "index_cache")
    return {
        "model.num_hidden_layers": 2, "model.hidden_size": 64, "model.intermediate_size": 128,
        "model.num_attention_heads": 4, "model.num_key_value_heads": 2, "model.max_position_embeddings": 64,
        "model.dropout": 0.1,  # attention dropout on: resume must replay the same masks
        "dataset.paths": token_glob, "validation_dataset.paths": token_glob,
        "dataset.index_mapping_dir": cache, "validation_dataset.index_mapping_dir": cache,
        "dataset.seq_length": SEQ, "validation_dataset.seq_length": SEQ,
        "dataset.split": "0.9, 0.1, 0.0", "validation_dataset.split": "0.9, 0.1, 0.0",
        "validation_dataset.num_val_samples": VAL_SAMPLES,
        "step_scheduler.global_batch_size": 8, "step_scheduler.local_batch_size": 4,
        "step_scheduler.max_steps": STEPS, "step_scheduler.val_every_steps": 4, "step_scheduler.ckpt_every_steps": 6,
        "lr_scheduler.lr_warmup_steps": 3, "logging.log_every_steps": 1,
        "checkpoint.checkpoint_dir": ckpt_dir,
    }


def as_flags(overrides: dict) -> list[str]:
    return ["--config", "configs/llama.py:tiny"] + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def llama_run(token_glob, tmp_path_factory):  # noqa: F811 (the imported fixture)
    ckpt = str(tmp_path_factory.mktemp("llama") / "ckpt")
    r = python("-m", "jaxpretrain.train", *as_flags(llama_overrides(token_glob, ckpt)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ckpt, r.stdout


def test_llama_trains_with_the_seed_lines(llama_run):
    _, out = llama_run
    steps = [m for m in map(STEP_LINE.search, out.splitlines()) if m]
    assert [int(m.group(1)) for m in steps] == list(range(1, STEPS + 1))
    losses = [float(m.group(3)) for m in steps]
    assert losses[0] > 10.0  # ln(50257) = 10.8 at init: the GPT-2-tokenized corpus, vocabulary 50257
    assert losses[-1] < losses[0] - 1.0
    vals = [m for m in map(VAL_LINE.search, out.splitlines()) if m]
    assert [int(m.group(1)) for m in vals] == [4, 6, 8, 12]
    assert "Trainable parameters:" in out


def test_llama_export_scores_validation_at_the_logged_loss(llama_run, token_glob, tmp_path):  # noqa: F811
    """The exported directory, in transformers' torch LlamaForCausalLM, gives the last logged val loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpretrain.data import build_gpt_datasets

    ckpt, out = llama_run
    logged = float([m for m in map(VAL_LINE.search, out.splitlines()) if m][-1].group(3))
    hf_dir = str(tmp_path / "hf")
    r = python("-m", "jaxpretrain.export", "--checkpoint-dir", ckpt, "--output", hf_dir)
    assert r.returncode == 0, r.stderr
    valid = build_gpt_datasets(token_glob, seq_length=SEQ, split="0.9, 0.1, 0.0", seed=1234, num_samples=(0, VAL_SAMPLES, 0))[1]
    ids = torch.tensor(np.stack([valid[i]["input_ids"] for i in range(VAL_SAMPLES)]).astype(np.int64))
    labels = torch.tensor(np.stack([valid[i]["labels"] for i in range(VAL_SAMPLES)]).astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    assert abs(loss - logged) < 2e-4, (loss, logged)


def test_llama_sigterm_then_resume_gives_identical_losses(llama_run, token_glob, tmp_path):  # noqa: F811
    base_ckpt, _ = llama_run
    expected = train_losses(base_ckpt)
    ckpt = str(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "jaxpretrain.train", *as_flags(llama_overrides(token_glob, ckpt))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        m = STEP_LINE.search(line)
        if m and int(m.group(1)) == 2:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 75, "".join(seen) + rest  # 75: stopped by SIGTERM after saving
    stopped = re.search(r"SIGTERM: saved step (\d+)", rest)
    assert stopped, rest
    stop_step = int(stopped.group(1))
    assert stop_step < STEPS

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at step {stop_step}" in r.stdout
    assert train_losses(ckpt) == expected  # bit for bit, before and after the interruption


def test_generate_from_the_checkpoint(llama_run):
    ckpt, _ = llama_run
    r = python("-m", "jaxpretrain.generate", "--checkpoint-dir", ckpt, "--prompt", "import os", "--max-new-tokens", "8",
               "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("import os") and "tokens/s" in r.stdout.strip().splitlines()[-1]
    assert "WARNING:absl" not in r.stderr, r.stderr  # Orbax's read-only notices, silenced as in export


@pytest.mark.parametrize("preset,params", [("tiny", None), ("150m", None), ("1b", 1_235_814_400)])
def test_presets_build_the_shapes_they_name(preset, params):
    """Each preset's model, counted by transformers on the meta device (nothing allocated) and by ours."""
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    import jaxpretrain.model as M
    from jaxpretrain.train.setup import model_config

    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import llama as presets

    cfg = presets.get_config(preset)
    config = model_config(cfg)
    assert M.family_of(config).name == "llama" and config.vocab_size == (50257 if preset == "tiny" else 128256)
    with torch.device("meta"):
        reference = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    ours = M.param_count(nnx.merge(*M.abstract_model(config)))
    assert ours == reference and (params is None or ours == params)
    if preset == "1b":  # Llama 3.2 1B
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                config.intermediate_size, config.tie_word_embeddings) == (2048, 16, 32, 8, 8192, True)
        assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0


def test_unsupported_model_field_on_the_command_line_is_one_line(token_glob, tmp_path):  # noqa: F811
    o = llama_overrides(token_glob, str(tmp_path / "ckpt"))
    bad = '--config.model.rope_parameters={"rope_type": "yarn", "factor": 2.0}'
    r = python("-m", "jaxpretrain.train", *as_flags(o), bad, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rope_type" in errors[0] and "yarn" in errors[0], r.stderr
    assert not os.path.exists(tmp_path / "ckpt"), "nothing is written for a run that cannot start"
