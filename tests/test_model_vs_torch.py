"""jaxpretrain's GPT-2 against transformers' torch GPT2LMHeadModel on random local checkpoints."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import GPT2Config
from transformers import GPT2LMHeadModel as TorchGPT2

import jaxpretrain.model as M
from jaxpretrain.errors import UserError
from jaxpretrain.model import hf

SHAPES = {
    "small-gelu_new": dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=97, activation_function="gelu_new"),
    "wide-gelu": dict(n_layer=3, n_embd=48, n_head=3, n_positions=24, vocab_size=1000, activation_function="gelu"),
    "one-layer-relu": dict(
        n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=50, activation_function="relu", n_inner=40
    ),
    # GPT2Config's other branches: attention unscaled by sqrt(head_dim) but by 1/(layer index + 1), the
    # tanh gelu under its torch name, a LayerNorm epsilon of its own, and the upcast flag (float32 here,
    # so only its acceptance is at stake).
    "attention-flags": dict(
        n_layer=3, n_embd=32, n_head=4, n_positions=12, vocab_size=120, activation_function="gelu_pytorch_tanh",
        scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
        layer_norm_epsilon=1e-3,
    ),
}


def _config(**kw) -> GPT2Config:
    # Token ids inside the tiny vocabularies keep transformers' config validation quiet.
    return GPT2Config(bos_token_id=0, eos_token_id=0, **kw)


def _torch_model(shape: str, seed: int = 0) -> TorchGPT2:
    """A random HF model; biases and LayerNorms perturbed too so every tensor's mapping is tested."""
    torch.manual_seed(seed)
    model = TorchGPT2(_config(**SHAPES[shape])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    torch_model = _torch_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path)
    return request.param, torch_model, str(path)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """One shape, for the tests that need not run on all of them."""
    torch_model = _torch_model("wide-gelu", seed=1)
    path = tmp_path_factory.mktemp("small")
    torch_model.save_pretrained(path)
    return "wide-gelu", torch_model, str(path)


def _ids(config, batch=2, seed=0, t=None):
    t = t or config.n_positions
    return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, t))


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ------------------------------------------------------------------------------------------------
# HF -> jaxpretrain -> HF
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_from_pretrained_logits_match_torch(checkpoint, vocab_multiple):
    _, torch_model, path = checkpoint
    model = M.from_pretrained(path, dtype=jnp.float32, vocab_multiple=vocab_multiple)
    ids = _ids(torch_model.config)
    logits = model(jnp.asarray(ids)) if vocab_multiple == 1 else _forward(model, jnp.asarray(ids))
    assert logits.shape == (2, torch_model.config.n_positions, torch_model.config.vocab_size)
    assert logits.dtype == jnp.float32
    assert _rel(logits, _torch_logits(torch_model, ids)) < 1e-5
    # Shorter sequences use the first positions only.
    short = _ids(torch_model.config, t=5)
    assert _rel(_forward(model, jnp.asarray(short)), _torch_logits(torch_model, short)) < 1e-5


def test_save_pretrained_roundtrip_is_exact(checkpoint, tmp_path):
    _, torch_model, path = checkpoint
    model = M.from_pretrained(path, vocab_multiple=64)
    M.save_pretrained(model, tmp_path / "out")
    original, saved = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "out/model.safetensors")
    assert set(saved) == {k for k in original if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    for name, tensor in saved.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
    with open(tmp_path / "out/config.json") as f:
        assert json.load(f)["vocab_size"] == torch_model.config.vocab_size


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_save_pretrained_of_fresh_model_loads_in_transformers(tmp_path, vocab_multiple):
    config = _config(**SHAPES["small-gelu_new"])
    model = M.create_model(config, seed=3, vocab_multiple=vocab_multiple)
    M.save_pretrained(model, tmp_path / "hf")
    loaded = TorchGPT2.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(config)
    assert _rel(_torch_logits(loaded, ids), _forward(model, jnp.asarray(ids))) < 1e-5
    # Saving again over the directory replaces it whole.
    M.save_pretrained(M.create_model(config, seed=4), tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_sharded_safetensors_checkpoint(tmp_path):
    torch_model = _torch_model("wide-gelu")
    torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = M.from_pretrained(tmp_path)
    ids = _ids(torch_model.config)
    assert _rel(_forward(model, jnp.asarray(ids)), _torch_logits(torch_model, ids)) < 1e-5


def test_openai_names_and_bfloat16_checkpoint(tmp_path, small_checkpoint):
    """The hub's original GPT-2 files: no "transformer." prefix, attn.bias buffers; here in bf16."""
    _, torch_model, path = small_checkpoint
    from safetensors.numpy import save_file

    tensors = {k.removeprefix("transformer."): v for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
    tensors["lm_head.weight"] = tensors["wte.weight"]  # the tied head, stored as well
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
    save_file(bf16, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    torch_model.config.save_pretrained(tmp_path)
    model = M.from_pretrained(tmp_path)
    c_fc = model.h[1].mlp.c_fc.kernel[...]
    assert c_fc.dtype == jnp.float32
    np.testing.assert_array_equal(c_fc, bf16["h.1.mlp.c_fc.weight"].astype(np.float32))
    # A stored head unlike wte is not a tied GPT-2 (transformers would load it untied): refused.
    bf16["lm_head.weight"] = (tensors["wte.weight"] + 1.0).astype(jnp.bfloat16)
    save_file(bf16, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.weight differs from wte.weight"):
        M.from_pretrained(tmp_path)


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "vocab.json").write_text("{}")
    (src / "merges.txt").write_text("#version: 0.2\n")
    model = M.create_model(_config(**SHAPES["one-layer-relu"]))
    M.save_pretrained(model, tmp_path / "out", tokenizer_files_from=src)
    assert {"vocab.json", "merges.txt", "config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "out"))
    M.save_pretrained(model, tmp_path / "named", tokenizer="gpt2")  # the embedded GPT-2 tokenizer
    assert {"tokenizer.json", "vocab.json"} <= set(os.listdir(tmp_path / "named"))
    with pytest.raises(UserError, match="tokenizer files"):
        M.save_pretrained(model, tmp_path / "bad", tokenizer_files_from=tmp_path / "missing")
    assert sorted(os.listdir(tmp_path)) == ["named", "out", "tok"]  # nothing half-written left behind


def test_bad_checkpoints_are_user_errors(tmp_path, small_checkpoint):
    _, _, path = small_checkpoint
    with pytest.raises(UserError, match="config"):
        M.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(UserError, match="model.safetensors"):
        M.from_pretrained(tmp_path)
    # A config passed in replaces config.json (e.g. dropout changed); shapes must still agree.
    model = M.from_pretrained(path, config=M.config_from(path, dropout=0.0))
    assert model.config.attn_pdrop == 0.0 and not model.has_dropout
    # A config that disagrees with the weights names the tensor.
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["n_embd"] *= 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(UserError, match="shape"):
        M.from_pretrained(bad)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


def _labels(ids, seed=1):
    labels = np.roll(ids, -1, axis=1)
    labels[np.random.RandomState(seed).rand(*labels.shape) < 0.2] = -100
    return labels


def _jax_loss(model, ids, labels):
    # The recipe's loss: summed token cross-entropy over label tokens of the batch.
    logits = model(ids)
    mask = labels != -100
    target = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(nll * mask) / jnp.sum(mask)


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_match_torch(checkpoint, remat):
    shape, torch_model, path = checkpoint
    if remat and shape != "wide-gelu":
        pytest.skip("remat checked on one shape")
    ids = _ids(torch_model.config, batch=3)
    labels = _labels(ids)

    torch_model.zero_grad()
    logits = torch_model(torch.tensor(ids)).logits
    t_labels = torch.tensor(labels)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), t_labels.reshape(-1), ignore_index=-100, reduction="sum"
    ) / (t_labels != -100).sum()
    loss.backward()
    torch_grads = {n.removeprefix("transformer."): p.grad.numpy() for n, p in torch_model.named_parameters()}

    model = M.from_pretrained(path, vocab_multiple=64, remat=remat)
    jax_loss, grads = nnx.jit(nnx.value_and_grad(_jax_loss))(model, jnp.asarray(ids), jnp.asarray(labels))
    assert abs(float(jax_loss) - loss.item()) < 1e-5 * abs(loss.item())
    flat = dict(nnx.to_flat_state(grads))
    for hf_name, flax_path, layout in hf.name_pairs(torch_model.config.n_layer):
        g = np.asarray(flat[flax_path].get_value())
        if layout == "rows":
            assert not g[torch_model.config.vocab_size :].any(), "padding rows got a gradient"
        g = hf.to_hf(layout, g, torch_model.config.vocab_size)
        ref = torch_grads[hf_name]
        err = np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1e-12)
        assert err < 1e-4, (hf_name, err)


# ------------------------------------------------------------------------------------------------
# Initialisation, dropout, precision, config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["wide-gelu", "one-layer-relu"])
def test_flops_per_token(shape):
    """nanoGPT's count: 6 x (transformers' parameter count less the position table, which a token only
    looks up) + 12 L H Q T for attention, at T = 24; and the 124M preset's own figure."""
    config = _config(**SHAPES[shape])
    n = sum(p.numel() for p in TorchGPT2(config).parameters()) - config.n_positions * config.n_embd
    want = 6 * n + 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * 24
    assert M.flops_per_token(config, 24) == want
    gpt2_124m = GPT2Config()  # 124,439,808 parameters with the 1024 x 768 position table
    assert M.flops_per_token(gpt2_124m, 1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024


def test_init_statistics_follow_hf_init_weights():
    config = _config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=1000)
    model = M.create_model(config, seed=0, vocab_multiple=128)
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = np.asarray(var.get_value())
        name = ".".join(map(str, path))
        assert x.dtype == np.float32, name
        if path[-1] == "scale":
            np.testing.assert_array_equal(x, 1.0, err_msg=name)
        elif path[-1] == "bias":
            np.testing.assert_array_equal(x, 0.0, err_msg=name)
        else:
            if path[0] == "wte":
                assert not x[config.vocab_size :].any(), "padding rows must start at zero"
                x = x[: config.vocab_size]
            want = proj_std if path[-2] == "c_proj" else 0.02
            assert abs(x.mean()) < 0.1 * want, name
            assert abs(x.std() / want - 1) < 0.05, (name, x.std(), want)
    d, v, p = config.n_embd, config.vocab_size, config.n_positions
    assert M.param_count(model) == v * d + p * d + config.n_layer * (12 * d * d + 13 * d) + 2 * d
    # The seed decides the weights.
    other = M.create_model(config, seed=1, vocab_multiple=128)
    assert not np.array_equal(model.h[1].mlp.c_fc.kernel[...], other.h[1].mlp.c_fc.kernel[...])
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves))
    np.testing.assert_allclose(float(M.param_l2_norm(model)), want, rtol=1e-5)


def test_dropout_is_keyed_and_off_by_default(small_checkpoint):
    _, torch_model, path = small_checkpoint
    model = M.from_pretrained(path)  # GPT-2 configs default to 0.1 dropout everywhere
    ids = jnp.asarray(_ids(torch_model.config))
    eval_logits = model(ids)
    np.testing.assert_array_equal(eval_logits, model(ids, deterministic=True))
    train = nnx.jit(lambda m, x, key: m(x, deterministic=False, rngs=key))
    a = model(ids, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b, c = train(model, ids, jax.random.key(0)), train(model, ids, jax.random.key(1))
    assert not np.allclose(a, eval_logits) and not np.allclose(b, c)
    np.testing.assert_array_equal(b, train(model, ids, jax.random.key(0)))
    with pytest.raises(ValueError, match="rngs"):
        model(ids, deterministic=False)


def test_explicit_attention_equals_fused_attention():
    config = _config(**SHAPES["small-gelu_new"])
    attn = M.gpt2.Attention(
        config, 0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, attention_impl=None
    )
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 16, 4, 8))
    fused = jax.nn.dot_product_attention(q, k, v, scale=attn.scale, is_causal=True)
    attn.attn_pdrop = 0.0  # _dropout is then the identity: only the attention itself is compared
    np.testing.assert_allclose(attn._attention_with_dropout(q, k, v, jax.random.key(1)), fused, atol=1e-6)


def test_layernorm_in_bfloat16_follows_torch_autocast():
    """bf16 activations far from zero (offset 3, spread 0.05) through torch's LayerNorm under bf16
    autocast (statistics in float32) and ours: within one bf16 rounding step, and rarely even that
    (0.3% of values); statistics taken in bf16 would be off by up to 0.2 in most of them."""
    import torch

    from jaxpretrain.model.gpt2.model import LayerNorm

    rng = np.random.RandomState(0)
    dim = 512
    x = torch.tensor(rng.randn(4, 8, dim) * 0.05 + 3.0, dtype=torch.float32).to(torch.bfloat16)
    weight, bias = (1 + 0.1 * rng.randn(dim)).astype(np.float32), (0.1 * rng.randn(dim)).astype(np.float32)
    ref = torch.nn.LayerNorm(dim, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(weight))
        ref.bias.copy_(torch.tensor(bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(x).detach().to(torch.bfloat16).float().numpy()
    ours = LayerNorm(dim, 1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ours.scale.value, ours.bias.value = jnp.asarray(weight), jnp.asarray(bias)
    got = np.asarray(ours(jnp.asarray(x.float().numpy()).astype(jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-10)  # one bf16 step (8 bits of mantissa)
    assert np.mean(got != want) < 0.01


def test_bfloat16_compute_keeps_float32_params_and_logits(small_checkpoint):
    _, torch_model, path = small_checkpoint
    model = M.from_pretrained(path, dtype=jnp.bfloat16, vocab_multiple=64, remat="dots_with_no_batch_dims_saveable")
    assert model.h[0].mlp.c_fc.kernel[...].dtype == jnp.float32
    ids = _ids(torch_model.config)
    logits = jax.jit(lambda x: model(x))(jnp.asarray(ids))
    assert logits.dtype == jnp.float32
    assert _rel(logits, _torch_logits(torch_model, ids)) < 5e-2
    if jax.default_backend() == "cpu":
        cudnn = M.from_pretrained(path, dtype=jnp.bfloat16, attention_impl="cudnn")
        with pytest.raises(UserError, match="attention_impl"):
            cudnn(jnp.asarray(ids))


def test_config_from_sources(tmp_path):
    assert M.config_from(None).n_layer == 12 and M.config_from("gpt2").vocab_size == 50257
    c = M.config_from({"n_layer": 2, "n_embd": 8, "n_head": 2}, n_head=4, dropout=0.0, vocab_size=None)
    assert (c.n_layer, c.n_head, c.attn_pdrop, c.vocab_size) == (2, 4, 0.0, 50257)
    c.save_pretrained(tmp_path)
    assert M.config_from(tmp_path).n_embd == 8 and M.config_from(tmp_path / "config.json").n_head == 4
    with pytest.raises(UserError, match="n_head"):
        M.config_from(None, n_head=5)
    with pytest.raises(UserError, match="model.n_blocks"):
        M.config_from(None, n_blocks=2)
    with pytest.raises(UserError, match="activation_function"):
        M.config_from(None, activation_function="gelu_xyz")
    with pytest.raises(UserError, match="missing.json"):
        M.config_from(tmp_path / "missing.json")
