"""jaxpretrain's Llama family against transformers' torch LlamaForCausalLM / Qwen2ForCausalLM /
MistralForCausalLM on small random local checkpoints (saved with save_pretrained, loaded with ours)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

import jaxpretrain.model as M
from jaxpretrain.errors import UserError
from jaxpretrain.model import hf

_BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=32,
             bos_token_id=0, eos_token_id=1)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)  # short enough that every frequency band is exercised
SHAPES = {
    "llama-gqa": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mha-tied-bias-llama3-head_dim": (LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=24, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_parameters=LLAMA3)),
    "llama-mqa-linear": (LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2-gqa-tied": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral-gqa": (MistralConfig, dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None)),
}


def _config(shape: str):
    cls, kw = SHAPES[shape]
    return cls(**_BASE, **kw)


def _torch_model(shape: str, seed: int = 0):
    """A random HF model; norms and biases perturbed too so every tensor's mapping is tested."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(shape)).eval()
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


def _ids(config, batch=2, seed=0, t=16):
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
# HF -> jaxpretrain: logits and gradients
# ------------------------------------------------------------------------------------------------


def _labels(ids, seed=1):
    labels = np.roll(ids, -1, axis=1)
    labels[np.random.RandomState(seed).rand(*labels.shape) < 0.2] = -100
    return labels


def _ce_sum_and_logits(model, ids, labels):
    logits = model(ids)
    mask = labels != -100
    target = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target) * mask), logits


_loss_logits_grads = nnx.jit(nnx.value_and_grad(_ce_sum_and_logits, has_aux=True))


def _torch_loss_logits_grads(torch_model, ids, labels):
    torch_model.zero_grad()
    logits = torch_model(torch.tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(labels).reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss.backward()
    return loss.item(), logits.detach().numpy(), {n: p.grad.numpy() for n, p in torch_model.named_parameters()}


@pytest.fixture(scope="module")
def compared(checkpoint):
    """One jitted forward + backward of ours (loaded from the torch model's directory) and torch's,
    on the same batch: (ours, torch's) as (summed CE, logits, {hf name: gradient})."""
    shape, torch_model, path = checkpoint
    ids = _ids(torch_model.config, batch=3)
    labels = _labels(ids)
    # Vocabulary padding on all but one shape: padded rows must never show.
    model = M.from_pretrained(path, dtype=jnp.float32, vocab_multiple=1 if shape == "mistral-gqa" else 16)
    (loss, logits), grads = _loss_logits_grads(model, jnp.asarray(ids), jnp.asarray(labels))
    return model, (float(loss), np.asarray(logits), _grads_as_hf(model, grads)), _torch_loss_logits_grads(torch_model, ids, labels)


def _grads_as_hf(model, grads) -> dict[str, np.ndarray]:
    config = model.config
    flat = dict(nnx.to_flat_state(grads))
    out = {}
    for hf_name, flax_path, layout in M.family_of(config).name_table(config):
        g = np.asarray(flat[flax_path].get_value())
        if layout == "rows":
            assert not g[config.vocab_size :].any(), f"{hf_name}: padding rows got a gradient"
        out[hf_name] = hf.to_hf(layout, g, config.vocab_size)
    return out


def _assert_grads_close(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    for name, g in ours.items():
        err = np.linalg.norm(g - ref[name]) / max(np.linalg.norm(ref[name]), 1e-12)
        assert err < 1e-4, (name, err)


def test_from_pretrained_logits_match_torch(checkpoint, compared):
    _, torch_model, _ = checkpoint
    model, (_, logits, _), (_, ref_logits, _) = compared
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == torch_model.config.model_type
    assert logits.shape == (3, 16, 101) and logits.dtype == np.float32
    assert _rel(logits, ref_logits) < 1e-5


def test_gradients_match_torch(compared):
    """The gradient of the summed CE w.r.t. every parameter, compared through the name table."""
    _, (loss, _, grads), (ref_loss, _, ref_grads) = compared
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    _assert_grads_close(grads, ref_grads)


def test_remat_gradients_match_torch(tmp_path):
    torch_model = _torch_model("llama-gqa", seed=2)
    torch_model.save_pretrained(tmp_path)
    ids = _ids(torch_model.config, batch=3)
    labels = _labels(ids)
    model = M.from_pretrained(tmp_path, remat=True)
    _, grads = _loss_logits_grads(model, jnp.asarray(ids), jnp.asarray(labels))
    _assert_grads_close(_grads_as_hf(model, grads), _torch_loss_logits_grads(torch_model, ids, labels)[2])


# ------------------------------------------------------------------------------------------------
# jaxpretrain -> HF
# ------------------------------------------------------------------------------------------------


def test_save_pretrained_roundtrip_is_exact(checkpoint, compared, tmp_path):
    _, torch_model, path = checkpoint
    model = compared[0]
    M.save_pretrained(model, tmp_path / "out")
    original, saved = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "out/model.safetensors")
    assert set(saved) == set(original)
    for name, tensor in saved.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
    with open(tmp_path / "out/config.json") as f:
        written = json.load(f)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    assert written["architectures"] == [arch[torch_model.config.model_type]]
    assert "rope_theta" not in written and "rope_type" in written["rope_parameters"]  # transformers 5's format
    assert M.param_count(model) == sum(p.numel() for p in torch_model.parameters())


@pytest.fixture(scope="module")
def fresh_model():
    """A freshly initialised (not loaded) untied Llama with attention biases and a pad token."""
    config = LlamaConfig(**{**_BASE, "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256},
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, pad_token_id=5)
    return config, M.create_model(config, seed=0, vocab_multiple=128)


def test_init_follows_hf_init_weights_and_counts(fresh_model):
    config, model = fresh_model
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = np.asarray(var.get_value())
        name = ".".join(map(str, path))
        assert x.dtype == np.float32, name
        if path[-2].endswith("layernorm") or path[0] == "norm":
            np.testing.assert_array_equal(x, 1.0, err_msg=name)
        elif path[-1] == "bias":
            np.testing.assert_array_equal(x, 0.0, err_msg=name)
        else:
            if path[0] in ("embed_tokens", "lm_head"):
                assert not x[config.vocab_size :].any(), "padding rows must start at zero"
                if path[0] == "embed_tokens":
                    assert not x[5].any(), "the pad token's row starts at zero (nn.Embedding padding_idx)"
                x = x[: config.vocab_size]
            assert abs(x.mean()) < 0.1 * 0.02, name
            assert abs(x.std() / 0.02 - 1) < 0.05, (name, x.std())
    torch_model = AutoModelForCausalLM.from_config(config)
    assert M.param_count(model) == sum(p.numel() for p in torch_model.parameters())


def test_save_pretrained_of_fresh_model_loads_in_transformers(fresh_model, tmp_path):
    config, model = fresh_model
    M.save_pretrained(model, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = _ids(config)
    assert _rel(_torch_logits(loaded, ids), _forward(model, jnp.asarray(ids))) < 1e-5


def test_save_pretrained_of_tied_qwen2_loads_in_transformers(tmp_path):
    config = _config("qwen2-gqa-tied")
    model = M.create_model(config, seed=3, vocab_multiple=16)
    M.save_pretrained(model, tmp_path / "hf")
    assert "lm_head.weight" not in load_file(tmp_path / "hf/model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    ids = _ids(config)
    assert _rel(_torch_logits(loaded, ids), _forward(model, jnp.asarray(ids))) < 1e-5


def test_old_format_config_and_inv_freq_buffers(tmp_path):
    """A pre-transformers-5 checkpoint: rope_theta + rope_scaling at the top level, inv_freq buffers."""
    torch_model = _torch_model("llama-mha-tied-bias-llama3-head_dim")
    torch_model.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(12, np.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # a tied copy some files carry
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = M.from_pretrained(tmp_path)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    ids = _ids(model.config)
    assert _rel(_forward(model, jnp.asarray(ids)), _torch_logits(torch_model, ids)) < 1e-5


def _edited_checkpoint(path, shape: str, edit):
    """A random torch model of `shape` saved to `path` with `edit(config_dict)` applied to its
    config.json, and transformers' model read back from that directory (the reference)."""
    _torch_model(shape).save_pretrained(path)
    cfg = json.load(open(path / "config.json"))
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return AutoModelForCausalLM.from_pretrained(path).eval()


LLAMA3_OLD = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


@pytest.mark.parametrize("case,edit", [
    # rope_parameters without a theta next to a top-level rope_theta: the top-level one counts
    ("top-level-theta", lambda d: d.update(rope_parameters={"rope_type": "default"}, rope_theta=1e6)),
    # a transformers-5 file to which an old rope_scaling was added: rope_scaling wins
    ("rope_scaling-over-rope_parameters", lambda d: d.update(rope_scaling={"type": "linear", "factor": 4.0})),
    # llama3 scaling with a top-level original_max_position_embeddings: the top-level length counts
    ("llama3-top-level-original-length", lambda d: (d.pop("rope_parameters"), d.update(
        rope_theta=5e5, original_max_position_embeddings=8, rope_scaling=LLAMA3_OLD))),
])
def test_mixed_rope_fields_follow_transformers_precedence(tmp_path, case, edit):
    """config.json files that mix the two generations of RoPE fields: the logits transformers
    computes from the same directory (each case gave 6e-2 to 1e-1 relative error before)."""
    reference = _edited_checkpoint(tmp_path, "llama-gqa", edit)
    model = M.from_pretrained(tmp_path)
    ids = _ids(model.config)
    assert _rel(_forward(model, jnp.asarray(ids)), _torch_logits(reference, ids)) < 1e-5


@pytest.mark.parametrize("shape", ["llama-mha-tied-bias-llama3-head_dim", "qwen2-gqa-tied"])
def test_tied_config_with_a_different_stored_head_is_refused(tmp_path, shape):
    """tie_word_embeddings with an lm_head.weight unlike the embedding: transformers then leaves the head
    untied (a different model than a tied load); ours refuses in one line instead of dropping the head."""
    from safetensors.numpy import save_file

    _torch_model(shape).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(reference.config)
    tied = M.config_from(str(tmp_path))
    with pytest.raises(UserError, match="lm_head.weight differs from model.embed_tokens.weight") as e:
        M.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    # The way out the message names: an untied load, which is transformers' model.
    untied = M.from_pretrained(tmp_path, config=M.config_from(tied, tie_word_embeddings=False))
    assert _rel(_forward(untied, jnp.asarray(ids)), _torch_logits(reference, ids)) < 1e-5


def test_bfloat16_checkpoint_exports_as_float32(tmp_path):
    """A bf16 checkpoint loads into float32 masters; the export's config.json says float32, so
    transformers' default dtype="auto" does not truncate the round trip to bf16."""
    _torch_model("llama-gqa").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = M.from_pretrained(tmp_path / "bf16")
    M.save_pretrained(model, tmp_path / "out")
    assert json.load(open(tmp_path / "out/config.json"))["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.dtype == torch.float32
    ids = _ids(model.config)
    assert _rel(_torch_logits(loaded, ids), _forward(model, jnp.asarray(ids))) < 1e-5


def test_mistral_attention_bias_flag_is_ignored_as_transformers_does(tmp_path):
    """transformers' Mistral has no biases whatever attention_bias says: neither has ours."""
    reference = _edited_checkpoint(tmp_path, "mistral-gqa", lambda d: d.update(attention_bias=True))
    model = M.from_pretrained(tmp_path)
    ids = _ids(model.config)
    assert _rel(_forward(model, jnp.asarray(ids)), _torch_logits(reference, ids)) < 1e-5


# ------------------------------------------------------------------------------------------------
# Layouts: sliced reads
# ------------------------------------------------------------------------------------------------


class _Recording:
    """A safetensors slice that records how many elements each read returns."""

    def __init__(self, sl):
        self.sl, self.read = sl, 0

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, index):
        out = self.sl[index]
        self.read += out.size
        return out


@pytest.mark.parametrize(
    "layout,hf_shape,flax_shape,index",
    [
        ("t_heads_out", (4 * 6, 10), (10, 4, 6), (slice(0, 5), slice(2, 4), slice(None))),  # whole heads
        ("t_heads_out", (4 * 6, 10), (10, 4, 6), (slice(5, 10), slice(1, 3), slice(3, 6))),  # split heads
        ("t_heads_in", (10, 4 * 6), (4, 6, 10), (slice(1, 3), slice(None), slice(5, 10))),
        ("t_heads_in", (10, 4 * 6), (4, 6, 10), (slice(0, 4), slice(0, 2), slice(0, 5))),
        ("heads", (4 * 6,), (4, 6), (slice(2, 4), slice(None))),
        ("heads", (4 * 6,), (4, 6), (slice(0, 2), slice(1, 4))),
        ("t", (12, 10), (10, 12), (slice(0, 5), slice(6, 12))),
    ],
)
def test_layouts_read_only_their_slice(tmp_path, layout, hf_shape, flax_shape, index):
    from safetensors.numpy import save_file

    full_hf = np.random.RandomState(0).randn(*hf_shape).astype(np.float32)
    save_file({"w": full_hf}, str(tmp_path / "w.safetensors"))
    assert hf.hf_shape(layout, flax_shape, vocab_size=0) == hf_shape
    # The Flax array, built independently of read_shard: HF's flat heads*head_dim axis unflattened.
    if layout == "t_heads_out":
        full_flax = full_hf.T.reshape(flax_shape)
    elif layout == "t_heads_in":
        full_flax = full_hf.reshape(hf_shape[0], flax_shape[0], flax_shape[1]).transpose(1, 2, 0)
    elif layout == "heads":
        full_flax = full_hf.reshape(flax_shape)
    else:
        full_flax = full_hf.T
    np.testing.assert_array_equal(hf.to_hf(layout, full_flax, 0), full_hf)
    with safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        tensor = _Recording(f.get_slice("w"))
        part = hf.read_shard(layout, tensor, flax_shape, index)
    np.testing.assert_array_equal(part, full_flax[index])
    assert tensor.read == part.size, "read more of the HF tensor than the shard needs"


# ------------------------------------------------------------------------------------------------
# Initialisation, FLOPs, dropout, precision
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama-gqa", "llama-mha-tied-bias-llama3-head_dim"])
def test_flops_per_token(shape):
    """6 x (parameters a token multiplies by: all but an untied input embedding) + 12 L H Q T."""
    config = _config(shape)
    torch_model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in torch_model.parameters())
    if not config.tie_word_embeddings:
        n -= torch_model.get_input_embeddings().weight.numel()
    heads, head_dim = config.num_attention_heads, config.head_dim
    want = 6 * n + 12 * config.num_hidden_layers * heads * head_dim * 16
    assert M.flops_per_token(config, 16) == want


def test_attention_dropout_is_keyed_and_off_by_default(checkpoint, compared):
    shape, _, path = checkpoint
    if shape != "llama-gqa":
        pytest.skip("checked on one shape")
    config = M.config_from(path, dropout=0.2)
    assert config.attention_dropout == 0.2 and M.family_of(config).dropout_active(config)
    model = M.from_pretrained(path, config=config, vocab_multiple=16)
    assert model.has_dropout
    ids = jnp.asarray(_ids(config, batch=3))
    eval_logits = compared[1][1]  # the same weights and batch without dropout
    np.testing.assert_allclose(_forward(model, ids), eval_logits, rtol=1e-6, atol=1e-6)  # off by default
    train = nnx.jit(lambda m, x, key: m(x, deterministic=False, rngs=key))
    b, c = train(model, ids, jax.random.key(0)), train(model, ids, jax.random.key(1))
    assert not np.allclose(b, eval_logits) and not np.allclose(b, c)
    np.testing.assert_array_equal(b, train(model, ids, jax.random.key(0)))
    with pytest.raises(ValueError, match="rngs"):
        model(ids, deterministic=False)


def test_rmsnorm_in_bfloat16_equals_transformers_llama_rmsnorm():
    """bf16 activations far from zero (offset 3, spread 0.05): transformers' LlamaRMSNorm (statistics in
    float32) and ours agree bit for bit; statistics taken in bf16 differ in about a quarter of them."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from jaxpretrain.model.llama.model import RMSNorm

    rng = np.random.RandomState(0)
    dim = 512
    x = torch.tensor(rng.randn(4, 8, dim) * 0.05 + 3.0, dtype=torch.float32).to(torch.bfloat16)
    weight = (1 + 0.1 * rng.randn(dim)).astype(np.float32)
    ref = LlamaRMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(weight))
    want = ref.to(torch.bfloat16)(x).detach().float().numpy()
    ours = RMSNorm(dim, 1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ours.weight.value = jnp.asarray(weight)
    got = ours(jnp.asarray(x.float().numpy()).astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_bfloat16_compute_keeps_float32_params_and_logits(tmp_path):
    torch_model = _torch_model("llama-gqa")
    torch_model.save_pretrained(tmp_path)
    model = M.from_pretrained(tmp_path, dtype=jnp.bfloat16, remat="dots_with_no_batch_dims_saveable")
    assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    ids = _ids(model.config)
    logits = jax.jit(lambda x: model(x))(jnp.asarray(ids))
    assert logits.dtype == jnp.float32
    assert _rel(logits, _torch_logits(torch_model, ids)) < 5e-2


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_config_from_sources_and_overrides(tmp_path):
    c = M.config_from({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}, num_hidden_layers=3,
                      num_key_value_heads=2, vocab_size=None, rope_theta=1e6)
    assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.vocab_size) == (3, 2, 16, 32000)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    c.save_pretrained(tmp_path)
    # A derived head_dim follows a new shape; an explicit one stays.
    assert M.config_from(tmp_path, hidden_size=128).head_dim == 32
    assert M.config_from({**c.to_dict(), "head_dim": 8}, hidden_size=128).head_dim == 8
    q = M.config_from({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "num_hidden_layers": 2},
                      num_hidden_layers=3, dropout=0.1)
    assert type(q).__name__ == "Qwen2Config" and q.layer_types == ["full_attention"] * 3 and q.attention_dropout == 0.1
    assert M.family_of(q).name == "llama"


@pytest.mark.parametrize(
    "source,overrides,field",
    [
        ({"model_type": "mistral"}, {}, "model.sliding_window"),  # MistralConfig's default window is 4096
        ({"model_type": "qwen2", "use_sliding_window": True}, {}, "model.use_sliding_window"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, {}, "rope_type"),
        ({"model_type": "llama", "hidden_act": "gelu"}, {}, "model.hidden_act"),
        ({"model_type": "llama", "num_attention_heads": 8}, {"num_key_value_heads": 3}, "model.num_key_value_heads"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, {},
         "partial_rotary_factor"),
        ({"model_type": "llama"}, {"num_blocks": 2}, "model.num_blocks"),
        ({"model_type": "llama"}, {"hidden_size": "wide"}, "hidden_size"),
        ({"model_type": "llama", "hidden_size": 64}, {"num_attention_heads": 5}, "model config"),
        ({"model_type": "falcon"}, {}, "model_type"),
    ],
)
def test_unsupported_fields_are_one_clear_line(source, overrides, field):
    with pytest.raises(UserError) as e:
        M.config_from(source, **overrides)
    message = str(e.value)
    assert field in message and "\n" not in message, message


def test_mistral_window_covering_every_position_is_accepted():
    """A window at least as long as the model's positions is full attention, so it is accepted."""
    config = MistralConfig(**_BASE, num_attention_heads=4, num_key_value_heads=2, sliding_window=32)
    assert M.config_from(config).sliding_window == 32
    with pytest.raises(UserError, match="sliding_window"):
        M.config_from(config, sliding_window=8)
    # Only up to there: a longer input would need the window transformers applies beyond it.
    model = M.create_model(M.config_from(config), seed=0)
    with pytest.raises(UserError, match="model.sliding_window: a 40-token input exceeds the 32-token window"):
        model(jnp.zeros((1, 40), jnp.int32))


# ------------------------------------------------------------------------------------------------
# An 8-device CPU mesh equals one device (a subprocess: the device count is fixed before jax starts)
# ------------------------------------------------------------------------------------------------

MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tp2": (1, 4, 2), "fsdp2_tp4": (1, 2, 4)}
MESH_KV_HEADS = 2  # fewer than tp=4: k/v projections must stay replicated over "tensor"


def _expected_spec(name: str, tp: int) -> tuple:
    """Mesh axes per dimension, written out by hand (not derived from the rules table)."""
    kv = "tensor" if MESH_KV_HEADS % tp == 0 else None
    return {
        "embed_tokens.embedding": ("tensor", "fsdp"), "lm_head.weight": ("tensor", "fsdp"),
        "input_layernorm.weight": ("fsdp",), "post_attention_layernorm.weight": ("fsdp",), "norm.weight": ("fsdp",),
        "self_attn.q_proj.kernel": ("fsdp", "tensor", None), "self_attn.q_proj.bias": ("tensor", None),
        "self_attn.k_proj.kernel": ("fsdp", kv, None), "self_attn.k_proj.bias": (kv, None),
        "self_attn.v_proj.kernel": ("fsdp", kv, None), "self_attn.v_proj.bias": (kv, None),
        "self_attn.o_proj.kernel": ("tensor", None, "fsdp"), "self_attn.o_proj.bias": ("fsdp",),
        "mlp.gate_proj.kernel": ("fsdp", "tensor"), "mlp.up_proj.kernel": ("fsdp", "tensor"),
        "mlp.down_proj.kernel": ("tensor", "fsdp"),
    }[name]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("llama_mesh")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, str(tmp)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["case"]: r["errors"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_model_layout_logits_and_grads_match_one_device(mesh_results, mesh):
    assert mesh_results[mesh] == []


def _run_mesh_subprocess(tmp):
    from jaxpretrain import parallel

    assert jax.device_count() == 8
    config = LlamaConfig(**_BASE, num_attention_heads=4, num_key_value_heads=MESH_KV_HEADS, attention_bias=True)
    torch.manual_seed(0)
    torch_model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch_model.save_pretrained(os.path.join(tmp, "hf"))
    ids, labels = _ids(config, batch=8), _labels(_ids(config, batch=8))

    one = M.from_pretrained(os.path.join(tmp, "hf"), vocab_multiple=16)  # 101 -> 112 rows: 8 | 112
    (ref_loss, ref_logits), ref_grads = _loss_logits_grads(one, jnp.asarray(ids), jnp.asarray(labels))
    ref_grads = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(ref_grads)}

    for mesh_name, (rep, fsdp, tp) in MESHES.items():
        errors = []
        mesh = parallel.make_mesh(dp_replicate_size=rep, dp_shard_size=fsdp, tp_size=tp)
        model = M.from_pretrained(os.path.join(tmp, "hf"), mesh=mesh, vocab_multiple=16)
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for path, var in flat.items():
            name = ".".join(str(p) for p in path if not isinstance(p, int)).removeprefix("layers.")
            array, want = var.get_value(), _expected_spec(name, tp)
            spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
            if spec != want + (None,) * (array.ndim - len(want)):
                errors.append(f"{path}: spec {array.sharding.spec}, expected {want}")
        shardings = M.state_shardings(nnx.state(model, nnx.Param), mesh)

        @nnx.jit
        def step(model, ids, labels):
            (loss, logits), grads = nnx.value_and_grad(_ce_sum_and_logits, has_aux=True)(model, ids, labels)
            return loss, logits, jax.lax.with_sharding_constraint(grads, shardings)

        batch = parallel.make_global_batch({"ids": ids, "labels": labels}, mesh)
        with jax.set_mesh(mesh):
            loss, logits, grads = step(model, batch["ids"], batch["labels"])
        if abs(float(loss) - float(ref_loss)) > 1e-5 * abs(float(ref_loss)):
            errors.append(f"loss {float(loss)} != {float(ref_loss)}")
        if _rel(logits, ref_logits) > 1e-5:
            errors.append(f"logits differ by {_rel(logits, ref_logits)}")
        for path, var in nnx.to_flat_state(grads):
            g, ref = np.asarray(var.get_value()), ref_grads[path]
            if np.linalg.norm(g - ref) > 1e-4 * np.linalg.norm(ref) + 1e-9:
                errors.append(f"{path}: gradient differs")
            if var.get_value().sharding != flat[path].get_value().sharding:
                errors.append(f"{path}: gradient sharding {var.get_value().sharding.spec}")
        print(json.dumps({"case": mesh_name, "errors": errors}), flush=True)


if __name__ == "__main__":
    import sys

    _run_mesh_subprocess(sys.argv[1])
