"""KV-cache generation (jaxpretrain/model/decode.py) against transformers' `generate` on the same
weights, for GPT-2 and Llama; sampling filters against transformers' logits warpers; the CLI's errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import run_module
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import jaxpretrain.model as M
from jaxpretrain.errors import UserError
from jaxpretrain.model.decode import Sampling, filter_logits, generate

CONFIGS = {
    "gpt2": GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=48, vocab_size=97, bos_token_id=0, eos_token_id=0),
    "llama": LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=48, bos_token_id=0, eos_token_id=0,
                         rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8)),
}
PROMPT_LEN, NEW = 7, 30


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(torch model, our model) with the same random weights, via save_pretrained / from_pretrained."""
    torch.manual_seed(0)
    torch_model = AutoModelForCausalLM.from_config(CONFIGS[request.param]).eval()
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # peaked enough that greedy picks are not near-ties
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path)
    return torch_model, M.from_pretrained(path)


def _prompt(batch=2):
    return np.random.RandomState(0).randint(1, 97, (batch, PROMPT_LEN))


def _hf_greedy(torch_model, prompt, eos=None, pad=0):
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor(prompt), max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=pad,
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
        )
    return out.numpy()


def test_greedy_equals_transformers_generate(pair):
    torch_model, model = pair
    prompt = _prompt()
    ref = _hf_greedy(torch_model, prompt)
    got = generate(model, prompt, Sampling(max_new_tokens=NEW, temperature=0.0))
    assert ref.shape == (2, PROMPT_LEN + NEW)
    np.testing.assert_array_equal(got, ref)


def test_greedy_stops_at_eos_like_transformers(pair):
    """A token that row 0 emits midway (and row 1 later or never) as eos: row 0 is padded after it, and
    generation ends when every row has finished, as transformers does."""
    torch_model, model = pair
    prompt = _prompt()
    free = _hf_greedy(torch_model, prompt)[:, PROMPT_LEN:]
    eos = int(free[0, NEW // 3])
    ref = _hf_greedy(torch_model, prompt, eos=eos, pad=3)
    got = generate(model, prompt, Sampling(max_new_tokens=NEW, temperature=0.0, eos_token_id=eos, pad_token_id=3))
    np.testing.assert_array_equal(got, ref)
    assert (got[0, PROMPT_LEN + NEW // 3 + 1 :] == 3).all()


def test_sampling_is_reproducible_by_seed(pair):
    _, model = pair
    prompt = _prompt(batch=3)
    s = Sampling(max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    a, b = generate(model, prompt, s), generate(model, prompt, s)
    np.testing.assert_array_equal(a, b)
    c = generate(model, prompt, Sampling(max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.9, seed=4))
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :PROMPT_LEN], prompt)
    assert ((a >= 0) & (a < 97)).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.3), (1.0, 0, 1e-6)])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.RandomState(1).randn(4, 97).astype(np.float32) * 3
    ref = torch.tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(jax.jit(filter_logits, static_argnums=2)(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref.numpy()))
    kept = ~np.isinf(got)
    np.testing.assert_allclose(got[kept], ref.numpy()[kept], rtol=1e-6)


def test_bad_sampling_parameters(pair):
    _, model = pair
    prompt = _prompt()
    for bad, field in [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                       (dict(top_k=-2), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(max_new_tokens=48), "max_new_tokens")]:  # 7 + 48 > the model's 48 positions
        with pytest.raises(UserError, match=field):
            generate(model, prompt, Sampling(**{"max_new_tokens": NEW, **bad}))


# ------------------------------------------------------------------------------------------------
# The CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A small Llama with the embedded GPT-2 tokenizer, as `jaxpretrain.export` would write it."""
    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)
    path = str(tmp_path_factory.mktemp("cli") / "hf")
    M.save_pretrained(M.create_model(config, seed=0), path, tokenizer="gpt2")
    return path


def test_cli_samples_and_reports_tokens_per_second(tiny_hf_dir):
    args = ["--model", tiny_hf_dir, "--prompt", "def f(x):", "--max-new-tokens", "12", "--num-samples", "2"]
    r = run_module("jaxpretrain.generate", *args, "--top-p", "0.9")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("def f(x):") == 2
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("generated 2 x ") and "tokens/s" in last, last


def test_cli_bad_parameters_and_directories_are_one_line(tiny_hf_dir, tmp_path):
    (tmp_path / "ckpt" / "12").mkdir(parents=True)  # what a training checkpoint directory looks like
    for args, expected in [
        (["--model", tiny_hf_dir, "--temperature", "-0.5"], "--temperature"),
        (["--model", tiny_hf_dir, "--top-p", "0"], "--top-p"),
        (["--model", tiny_hf_dir, "--top-p", "1.5"], "--top-p"),
        (["--model", tiny_hf_dir, "--top-k", "-1"], "--top-k"),
        (["--model", tiny_hf_dir, "--step", "2"], "--step: applies to --checkpoint-dir only"),
        (["--model", str(tmp_path / "missing")], "no such directory"),
        (["--model", str(tmp_path / "ckpt")], "--checkpoint-dir"),
        (["--checkpoint-dir", str(tmp_path / "missing")], "no such directory"),
    ]:
        r = run_module("jaxpretrain.generate", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], (args, r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_cli_help_describes_every_option():
    r = run_module("jaxpretrain.generate", "--help")
    assert r.returncode == 0, r.stderr
    for text in ('text to continue (default: "def ")', "tokens to add to each sample", "sampling seed"):
        assert text in " ".join(r.stdout.split()), r.stdout
