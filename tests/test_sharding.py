"""Parameters are born sharded as the rules say, on an 8-device CPU mesh.

The checks run in one subprocess started with 8 forced host devices (the flag must be set before
jax is imported, and the other tests expect the default single device); each pytest test below
reads its case's result.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tp2": (1, 4, 2), "replicate2_fsdp4": (2, 4, 1)}

# Mesh axes each parameter kind must be split over, dimension by dimension: written out by hand
# (not derived from the rules table) so the test says what FSDP/TP layout we promise.
EXPECTED = {
    "wte.embedding": ("tensor", "fsdp"),
    "wpe.embedding": (None, "fsdp"),
    "ln_1.scale": ("fsdp",), "ln_1.bias": ("fsdp",),
    "ln_2.scale": ("fsdp",), "ln_2.bias": ("fsdp",),
    "ln_f.scale": ("fsdp",), "ln_f.bias": ("fsdp",),
    "attn.c_attn.kernel": ("fsdp", None, "tensor"), "attn.c_attn.bias": (None, "tensor"),
    "attn.c_proj.kernel": ("tensor", "fsdp"), "attn.c_proj.bias": ("fsdp",),
    "mlp.c_fc.kernel": ("fsdp", "tensor"), "mlp.c_fc.bias": ("tensor",),
    "mlp.c_proj.kernel": ("tensor", "fsdp"), "mlp.c_proj.bias": ("fsdp",),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["case"]: r["errors"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("mesh", MESHES)
def test_fresh_model_is_born_sharded(results, mesh):
    assert results[f"create/{mesh}"] == []


@pytest.mark.parametrize("mesh", MESHES)
def test_loaded_model_is_sharded_and_exact(results, mesh):
    assert results[f"load/{mesh}"] == []


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_forward_and_grad_match_one_device(results, mesh):
    assert results[f"step/{mesh}"] == []


def test_make_global_batch(results):
    assert results["batch"] == []


def test_mesh_shapes(results):
    assert results["mesh"] == []


# ------------------------------------------------------------------------------------------------
# The subprocess (8 devices)
# ------------------------------------------------------------------------------------------------


def _expected_shard_shape(shape, axes, mesh_shape):
    return tuple(n // (mesh_shape[a] if a else 1) for n, a in zip(shape, axes + (None,) * len(shape)))


def _check_layout(model, mesh, errors):
    from flax import nnx

    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path if not isinstance(p, int)).removeprefix("h.")
        array = var.get_value()
        axes = EXPECTED[name]
        want = _expected_shard_shape(array.shape, axes, dict(mesh.shape))
        got = {tuple(s.data.shape) for s in array.addressable_shards}
        if got != {want}:
            errors.append(f"{path}: shards {got}, expected {want} (axes {axes})")
        if len(array.addressable_shards) != 8:
            errors.append(f"{path}: {len(array.addressable_shards)} shards")
        spec = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
        if spec != axes + (None,) * (array.ndim - len(axes)):
            errors.append(f"{path}: spec {array.sharding.spec}, expected {axes}")


def _max_elements(hlo_text):
    import re

    sizes = [1]
    for dims in re.findall(r"\b(?:f32|u32|bf16|s32)\[([0-9,]+)\]", hlo_text):
        n = 1
        for d in dims.split(","):
            n *= int(d)
        sizes.append(n)
    return max(sizes)


def _run_subprocess(tmp):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import GPT2Config, GPT2LMHeadModel

    import jaxpretrain.model as M
    from jaxpretrain import parallel
    from jaxpretrain.model import hf

    assert jax.device_count() == 8
    report = lambda case, errors: print(json.dumps({"case": case, "errors": errors}), flush=True)
    # Every sharded dimension divisible by 8; vocab 100 padded to 112 (= 2 x 56) for tp=2.
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    torch_model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch_model.save_pretrained(os.path.join(tmp, "hf"))
    ids = np.random.RandomState(0).randint(0, 100, (8, 32))
    labels = np.roll(ids, -1, axis=1)

    def loss_fn(model, ids, labels):
        logits = model(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])

    one_device = M.from_pretrained(os.path.join(tmp, "hf"), vocab_multiple=16)
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(loss_fn))(one_device, jnp.asarray(ids), jnp.asarray(labels))
    ref_grads = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(ref_grads)}

    for mesh_name, (rep, fsdp, tp) in MESHES.items():
        mesh = parallel.make_mesh(dp_replicate_size=rep, dp_shard_size=fsdp, tp_size=tp)

        # Fresh init: one jitted program whose outputs carry the rules' shardings, and whose
        # partitioned HLO never holds an array as large as a full sharded parameter.
        errors = []
        graphdef, init = M.sharded_init(config, mesh=mesh, seed=0, vocab_multiple=16)
        compiled = init.lower().compile()
        model = nnx.merge(graphdef, init())
        _check_layout(model, mesh, errors)
        params, outs = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(compiled.output_shardings)
        if len(params) != len(outs):
            errors.append(f"{len(outs)} compiled outputs for {len(params)} parameters")
        for param, out in zip(params, outs):
            if not out.is_equivalent_to(param.sharding, param.ndim):
                errors.append(f"{param.shape}: compiled output sharding {out} != {param.sharding}")
        biggest_shard = max(s.data.size for v in params for s in v.addressable_shards)
        if _max_elements(compiled.as_text()) > biggest_shard:
            errors.append(f"init materialises an array of {_max_elements(compiled.as_text())} elements")
        report(f"create/{mesh_name}", errors)

        # Loading: same layout, values equal to the file's.
        errors = []
        model = M.from_pretrained(os.path.join(tmp, "hf"), mesh=mesh, vocab_multiple=16)
        _check_layout(model, mesh, errors)
        flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        torch_params = dict(torch_model.named_parameters())
        for hf_name, path, layout in hf.name_pairs(config.n_layer):
            got = hf.to_hf(layout, np.asarray(flat[path].get_value()), config.vocab_size)
            if not np.array_equal(got, torch_params["transformer." + hf_name].detach().numpy()):
                errors.append(f"{hf_name}: values differ")
        report(f"load/{mesh_name}", errors)

        # A jitted loss and gradient under the mesh equals the one-device result.
        errors = []
        batch = parallel.make_global_batch({"ids": ids, "labels": labels}, mesh)
        # Gradients pinned to the parameters' shardings (XLA would otherwise pick, often replicated).
        shardings = M.state_shardings(nnx.state(model, nnx.Param), mesh)

        @nnx.jit
        def step(model, ids, labels):
            loss, grads = nnx.value_and_grad(loss_fn)(model, ids, labels)
            return loss, jax.lax.with_sharding_constraint(grads, shardings)

        with jax.set_mesh(mesh):
            loss, grads = step(model, batch["ids"], batch["labels"])
        if abs(float(loss) - float(ref_loss)) > 1e-5 * abs(float(ref_loss)):
            errors.append(f"loss {float(loss)} != {float(ref_loss)}")
        for path, var in nnx.to_flat_state(grads):
            g, ref = np.asarray(var.get_value()), ref_grads[path]
            if np.linalg.norm(g - ref) > 1e-4 * np.linalg.norm(ref) + 1e-9:
                errors.append(f"{path}: gradient differs")
            if var.get_value().sharding != flat[path].get_value().sharding:
                errors.append(f"{path}: gradient sharding {var.get_value().sharding.spec}")
        report(f"step/{mesh_name}", errors)

    # make_global_batch: rows split over replicate x fsdp, in order, replicated over tensor.
    errors = []
    mesh = parallel.make_mesh(dp_replicate_size=2, dp_shard_size=2, tp_size=2)
    local = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "loss_mask": np.ones((8, 5), np.float32)}
    batch = parallel.make_global_batch(local, mesh)
    for key, value in local.items():
        array = batch[key]
        if array.shape != value.shape or array.dtype != value.dtype:
            errors.append(f"{key}: {array.shape} {array.dtype}")
        if not np.array_equal(np.asarray(array), value):
            errors.append(f"{key}: values differ")
        if array.sharding.spec != jax.sharding.PartitionSpec(("replicate", "fsdp")):
            errors.append(f"{key}: spec {array.sharding.spec}")
        for shard in array.addressable_shards:
            if shard.data.shape != (2, 5) or not np.array_equal(shard.data, value[shard.index]):
                errors.append(f"{key}: shard {shard.index} on {shard.device}")
    try:
        parallel.make_global_batch({"x": np.zeros((6, 2))}, mesh)
        errors.append("a batch of 6 rows on a data-parallel size of 4 was accepted")
    except parallel.UserError:
        pass
    report("batch", errors)

    errors = []
    m = parallel.make_mesh(tp_size=2)
    if dict(m.shape) != {"replicate": 1, "fsdp": 4, "tensor": 2}:
        errors.append(f"fill: {m.shape}")
    for bad in (dict(tp_size=3), dict(dp_replicate_size=2, dp_shard_size=2)):
        try:
            parallel.make_mesh(**bad)
            errors.append(f"{bad} accepted on 8 devices")
        except parallel.UserError:
            pass
    report("mesh", errors)


if __name__ == "__main__":
    _run_subprocess(sys.argv[1])
