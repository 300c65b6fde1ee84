"""A real two-process run on CPU (gloo): initialize_distributed, global batches, sharded HF load
and save, each process holding 2 of the 4 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_is_a_no_op(monkeypatch):
    from jaxpretrain import parallel

    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize_distributed() is False
    # An sbatch script's own process (allocation of 8 tasks, no srun step) stays single-process.
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(parallel.UserError, match="JAX_NUM_PROCESSES"):
        parallel.initialize_distributed()


def test_two_processes(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=97, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        ids = np.random.RandomState(0).randint(0, 97, (4, 16))
        np.save(tmp_path / "ids.npy", ids)
        np.save(tmp_path / "logits.npy", model(torch.tensor(ids)).logits.numpy())
    model.save_pretrained(tmp_path / "hf")

    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    for pid, out in enumerate(outputs):
        # Each child's verdict comes in a file of its own: on the shared stdout/stderr pipe, C++ logs
        # (gloo's "Rank 0 is connected ...") can land in the middle of a printed line.
        with open(tmp_path / f"result_{pid}.json") as f:
            result = json.load(f)
        assert result["errors"] == [], (result, out[-5000:])

    # What the two processes saved together loads in transformers and is the same model.
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        logits = reloaded(torch.tensor(np.load(tmp_path / "ids.npy"))).logits.numpy()
    np.testing.assert_allclose(logits, np.load(tmp_path / "logits.npy"), rtol=0, atol=1e-5)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def _child(tmp: str) -> None:
    from jaxpretrain import parallel

    assert parallel.initialize_distributed() is True
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils

    import jaxpretrain.model as M

    errors = []
    pid = jax.process_index()
    if (jax.process_count(), jax.device_count(), jax.local_device_count()) != (2, 4, 2):
        errors.append(f"processes/devices: {jax.process_count()}, {jax.device_count()}, {jax.local_device_count()}")
    mesh = parallel.make_mesh()

    # Each process passes its own two rows; the global batch is the four rows in order.
    ids = np.load(os.path.join(tmp, "ids.npy"))
    batch = parallel.make_global_batch({"input_ids": ids[2 * pid : 2 * pid + 2]}, mesh)["input_ids"]
    if batch.shape != (4, 16):
        errors.append(f"global batch shape {batch.shape}")
    for shard in batch.addressable_shards:
        if not np.array_equal(np.asarray(shard.data), ids[shard.index]):
            errors.append(f"batch shard {shard.index} on process {pid}")

    # Loading reads each process's slices only; the sharded forward equals torch's.
    model = M.from_pretrained(os.path.join(tmp, "hf"), mesh=mesh, vocab_multiple=16)
    wte = model.wte.embedding.get_value()
    if wte.is_fully_addressable or len(wte.addressable_shards) != 2:
        errors.append("wte is not split across the two processes")
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, x: m(x))(model, batch)
    logits = multihost_utils.process_allgather(logits, tiled=True)
    err = np.abs(logits - np.load(os.path.join(tmp, "logits.npy"))).max()
    if err > 1e-5:
        errors.append(f"logits differ by {err}")

    # Both processes take part in the save; process 0 writes.
    M.save_pretrained(model, os.path.join(tmp, "saved"))
    with open(os.path.join(tmp, f"result_{pid}.json"), "w") as f:
        json.dump({"process": pid, "errors": errors}, f)


if __name__ == "__main__":
    _child(sys.argv[1])
