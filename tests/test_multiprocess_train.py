"""The train CLI as a two-host run on CPU: two real processes (one device each, gloo) joined through
JAX_COORDINATOR_ADDRESS. They train like one device, each reads only its half of every global batch,
SIGTERM to both saves one agreed step and the rerun resumes with the losses of an uninterrupted run,
and the Orbax checkpoint the two processes wrote together exports to a Hugging Face directory."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import Corpus
from test_train import ROOT, STEP_LINE, as_flags, python, tiny_overrides

EXIT_STOPPED = 75  # the train CLI's status after SIGTERM and a saved checkpoint (train/preemption.py)

STEPS = 8
GLOBAL, SHARE = 8, 4  # global batch; rows of it each of the 2 processes reads
# Local batch 2 on each of the 2 devices and 4 on one device: grad accumulation 2 in both runs, so
# micro-batch m is the same rows (m, m + 2, ...) and dropout, keyed by (step, micro-batch) and drawn
# layout-independently, masks the same activations: dropout stays on, and a resume must replay it.
LOCAL = {"one_device": 4, "two_processes": 2}
DROPOUT = 0.1
TIMEOUT = 240  # seconds per run; a hung collective fails the test instead of hanging it

# `python -m jaxpretrain.train` (the same module run as __main__), with every dataset read recorded:
# which sample indices this process asked the train dataset for.
RECORDING_TRAIN = textwrap.dedent(
    """
    import json, os, runpy, threading
    from jaxpretrain.data import loader

    lock, path = threading.Lock(), os.path.join(os.environ["READS_DIR"], f"process_{os.environ['JAX_PROCESS_ID']}.jsonl")

    class Recorded:
        def __init__(self, dataset):
            self.dataset = dataset
        def __len__(self):
            return len(self.dataset)
        def get_batch(self, indices):
            with lock, open(path, "a") as f:
                f.write(json.dumps({"n": len(self.dataset), "indices": [int(i) for i in indices]}) + "\\n")
            return self.dataset.get_batch(indices)

    init = loader._ReadLocalBatch.__init__
    loader._ReadLocalBatch.__init__ = lambda self, dataset, *a, **k: init(self, Recorded(dataset), *a, **k)

    # And every index-cache build (a cache miss): which indices this process built itself.
    from jaxpretrain.data import index_cache
    cached = index_cache.cached_arrays
    def recording_cached(cache_dir, base, names, description, build, *rest, **kw):
        def recorded_build():
            with lock, open(path.replace(".jsonl", ".builds.jsonl"), "a") as f:
                f.write(json.dumps({"base": base}) + "\\n")
            return build()
        return cached(cache_dir, base, names, description, recorded_build, *rest, **kw)
    index_cache.cached_arrays = recording_cached
    runpy.run_module("jaxpretrain.train", run_name="__main__", alter_sys=True)
    """
)


def overrides(corpus: Corpus, ckpt: str, layout: str = "two_processes") -> dict:
    return tiny_overrides(
        corpus, ckpt, **{
            "model.dropout": DROPOUT, "step_scheduler.max_steps": STEPS,
            "step_scheduler.global_batch_size": GLOBAL, "step_scheduler.local_batch_size": LOCAL[layout],
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The processes of one run, started together, output to `<workdir>/process_{i}.log`; `n > 1`: a
    run of n processes joined through a coordinator on a free port, else one plain `python -m`
    process; `devices`: CPU devices per process; `argv`: instead of the (recording) train CLI.

    Always used as a context manager: whatever happens in the test, no child outlives it.
    """

    def __init__(self, flags: list[str], workdir: str, n: int = 2, devices: int = 1, argv: list[str] | None = None,
                 timeout: float = TIMEOUT):
        self.workdir, self.reads_dir = workdir, os.path.join(workdir, "reads")
        os.makedirs(self.reads_dir, exist_ok=True)
        port = free_port()
        self.procs, self._files = [], []
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout
        for pid in range(n):
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
            for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
                env.pop(k, None)
            if n > 1:
                env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(pid))
            env["READS_DIR"] = self.reads_dir
            f = open(self.log_path(pid), "w")
            self._files.append(f)
            cmd = argv or (["-c", RECORDING_TRAIN] if n > 1 else ["-m", "jaxpretrain.train"])
            self.procs.append(subprocess.Popen(
                [sys.executable, *cmd, *flags], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
            ))

    def log_path(self, pid: int) -> str:
        return os.path.join(self.workdir, f"process_{pid}.log")

    def output(self, pid: int) -> str:
        with open(self.log_path(pid)) as f:
            return f.read()

    def wait_for(self, pattern: re.Pattern) -> None:
        """Until process 0 has printed a line matching `pattern`."""
        while not any(map(pattern.search, self.output(0).splitlines())):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > self._deadline:
                pytest.fail(f"no line matching {pattern.pattern!r}:\n" + self.output(0)[-3000:] + self.output(1)[-3000:])
            time.sleep(0.05)

    def wait(self, expect: int = 0) -> list[str]:
        """Every exit code must be `expect`; returns the outputs."""
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, self._deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{self.workdir}: still running after {self.timeout:.0f} s:\n" + self.output(0)[-3000:])
        outs = [self.output(pid) for pid in range(len(self.procs))]
        for pid, p in enumerate(self.procs):
            assert p.returncode == expect, f"{self.workdir}: process {pid} exited {p.returncode}:\n" + outs[pid][-4000:]
        return outs

    def builds(self, pid: int) -> list[str]:
        """The index caches process `pid` built itself (cache misses), in order."""
        path = os.path.join(self.reads_dir, f"process_{pid}.builds.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line)["base"] for line in f]

    def reads(self, pid: int, n_train: int) -> list[list[int]]:
        """The train-dataset reads of process `pid`, in order (each: one local batch's sample indices)."""
        with open(os.path.join(self.reads_dir, f"process_{pid}.jsonl")) as f:
            return [r["indices"] for r in map(json.loads, f) if r["n"] == n_train]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        for f in self._files:
            f.close()


def losses_of(ckpt: str, kind: str) -> dict[int, float]:
    with open(os.path.join(ckpt, "logs", f"{kind}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss" if kind == "train" else "val_loss"] for r in rows}


def n_train_samples(out: str) -> int:
    return int(re.search(r"Datasets: train (\d+) samples", out).group(1))


def batch_rows(pid: int, steps) -> list[list[int]]:
    """Process pid's rows of global batches `steps`: [4 pid, 4 pid + 4) of each."""
    return [list(range(k * GLOBAL + pid * SHARE, k * GLOBAL + (pid + 1) * SHARE)) for k in steps]


@dataclasses.dataclass
class Runs:
    one_device: str  # checkpoint dirs
    uninterrupted: str
    preempted: str
    outs: dict[str, list[str]]
    procs: dict[str, Processes]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> Runs:
    """Four runs of one config, independent ones overlapped (the CPUs idle while processes wait on each
    other): one device; two processes uninterrupted; two processes sent SIGTERM once process 0 has
    printed step 2; the same command again, which resumes."""
    work = str(tmp_path_factory.mktemp("runs"))
    ckpt = {name: os.path.join(work, name, "ckpt") for name in ("one_device", "uninterrupted", "preempted")}
    outs, procs = {}, {}
    with contextlib.ExitStack() as stack:
        def start(name, ckpt_dir, n=2):
            procs[name] = stack.enter_context(Processes(
                as_flags(overrides(corpus, ckpt_dir, "one_device" if n == 1 else "two_processes")), os.path.join(work, name), n
            ))
            return procs[name]

        start("one_device", ckpt["one_device"], n=1)
        start("uninterrupted", ckpt["uninterrupted"])
        first = start("preempted", ckpt["preempted"])
        first.wait_for(re.compile(r"\| step 2 \| epoch"))
        for p in first.procs:  # as SLURM does: every task of the job step gets the signal
            p.send_signal(signal.SIGTERM)
        outs["preempted"] = first.wait(expect=EXIT_STOPPED)
        outs["resumed"] = start("resumed", ckpt["preempted"]).wait()
        for name in ("one_device", "uninterrupted"):
            outs[name] = procs[name].wait()
    return Runs(ckpt["one_device"], ckpt["uninterrupted"], ckpt["preempted"], outs, procs)


def test_two_processes_train_like_one_device(runs):
    out0, out1 = runs.outs["uninterrupted"]
    assert "World size: 2 processes, 2 devices (cpu)" in out0
    assert re.search(r"Processes: launch: JAX_\* environment variables \| process 0 of 2 \| local devices 1 \(cpu\) \| "
                     r"global devices 2 \| coordinator 127\.0\.0\.1:\d+", out0), out0[:3000]
    assert "Batches: global 8 = local 2 x dp 2 x grad_accum 2" in out0
    assert "Batches: global 8 = local 4 x dp 1 x grad_accum 2" in runs.outs["one_device"][0]
    assert [int(m.group(1)) for m in map(STEP_LINE.search, out0.splitlines()) if m] == list(range(1, STEPS + 1))
    assert not STEP_LINE.search(out1)  # process 1 logs warnings only

    for kind, steps in (("train", list(range(1, STEPS + 1))), ("validation", [4, 6, 8])):
        one, two = losses_of(runs.one_device, kind), losses_of(runs.uninterrupted, kind)
        assert sorted(one) == sorted(two) == steps, kind
        np.testing.assert_allclose([two[s] for s in steps], [one[s] for s in steps], rtol=2e-5, err_msg=kind)

    # Process 0 built the index cache (train and validation GPTDataset and blend indices); process 1,
    # let in after it, found every file and built none.
    built = runs.procs["uninterrupted"].builds(0)
    assert any("GPTDataset-train" in b for b in built) and any("GPTDataset-valid" in b for b in built), built
    assert runs.procs["uninterrupted"].builds(1) == []

    # Process p read rows [4p, 4p + 4) of every global batch, each batch once, and no other rows.
    n = n_train_samples(out0)
    for pid in range(2):
        assert sorted(runs.procs["uninterrupted"].reads(pid, n)) == batch_rows(pid, range(STEPS)), pid

    # Each checkpoint written by both: each process its own array shards and its own loader position.
    for step in (6, 8):
        d = os.path.join(runs.uninterrupted, str(step))
        for item in ("params", "opt_state"):
            assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(d, item))), (step, item)
        for pid in range(2):
            with open(os.path.join(d, "data", f"process_{pid}-of-2.json")) as f:
                assert json.load(f) == {"next_index": step}


def test_sigterm_to_both_saves_one_step_and_resume_is_bit_identical(runs):
    first0, second0 = runs.outs["preempted"][0], runs.outs["resumed"][0]
    stopped = re.search(r"SIGTERM: saved step (\d+), exiting", first0)
    assert stopped, first0[-3000:]
    stop = int(stopped.group(1))
    assert 2 < stop < STEPS  # trained on to the agreed step, and stopped before the end
    assert f"SIGTERM: every process stops after step {stop}" in first0
    # Both processes saved that step: the checkpoint is complete (an Orbax save commits once every
    # process has written) and holds both processes' shards and loader positions.
    d = os.path.join(runs.preempted, str(stop))
    assert os.path.exists(os.path.join(d, "commit_success.txt"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(d, "params")))
    for pid in range(2):
        with open(os.path.join(d, "data", f"process_{pid}-of-2.json")) as f:
            assert json.load(f) == {"next_index": stop}

    assert f"Resumed from {d} at step {stop}" in second0
    assert [int(m.group(1)) for m in map(STEP_LINE.search, second0.splitlines()) if m] == list(range(stop + 1, STEPS + 1))
    # Each process's loader went on from its own saved position.
    n = n_train_samples(second0)
    for pid in range(2):
        assert sorted(runs.procs["resumed"].reads(pid, n)) == batch_rows(pid, range(stop, STEPS)), pid

    # Bit for bit: the losses of the uninterrupted two-process run, before and after the interruption.
    assert losses_of(runs.preempted, "train") == losses_of(runs.uninterrupted, "train")
    # Validation too, but for the checkpoint-step validation a stopping run skips (to exit quickly).
    want = losses_of(runs.uninterrupted, "validation")
    if stop % 4:  # val_every_steps
        want.pop(stop, None)
    assert losses_of(runs.preempted, "validation") == want


def test_export_of_a_two_process_checkpoint(runs, tmp_path):
    """`python -m jaxpretrain.export` reads the checkpoint the two processes wrote; the resumed run's
    final parameters are the uninterrupted run's, bit for bit."""
    from safetensors.numpy import load_file

    from jaxpretrain.export import export_checkpoint

    r = python("-m", "jaxpretrain.export", "--checkpoint-dir", runs.preempted, "--output", str(tmp_path / "resumed"), timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    export_checkpoint(runs.uninterrupted, str(tmp_path / "uninterrupted"))
    with open(tmp_path / "resumed" / "config.json") as f:
        assert json.load(f)["n_layer"] == 2
    got = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    want = load_file(str(tmp_path / "uninterrupted" / "model.safetensors"))
    assert sorted(got) == sorted(want) and len(want) > 10
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_one_process_checkpoint_resumes_in_two_processes(runs, corpus, tmp_path):
    """The one-device run's step-6 checkpoint (one loader position, `process_0-of-1.json`) resumed by
    two processes: each takes that position and reads its own rows of batches 6 and 7, and steps 7-8
    give the one-device run's losses."""
    ckpt = str(tmp_path / "ckpt")
    src = runs.one_device
    shutil.copytree(src, ckpt, ignore=lambda d, names: [n for n in names if d == src and n in ("logs", str(STEPS))])
    with Processes(as_flags(overrides(corpus, ckpt)), str(tmp_path / "run")) as p:
        out0, _ = p.wait()
        n = n_train_samples(out0)
        for pid in range(2):
            assert sorted(p.reads(pid, n)) == batch_rows(pid, range(6, STEPS)), pid
    assert f"Resumed from {ckpt}/6 at step 6" in out0
    got, want = losses_of(ckpt, "train"), losses_of(runs.one_device, "train")
    assert sorted(got) == [7, 8]
    np.testing.assert_allclose([got[s] for s in (7, 8)], [want[s] for s in (7, 8)], rtol=2e-5)
