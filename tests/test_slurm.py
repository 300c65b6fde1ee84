"""scripts/slurm/train.sbatch under a real one-node SLURM (tests/slurm_cluster.py): two tasks train like
one process, checkpoint and exit 0 without a requeue; `scancel --signal=TERM` mid-run saves, the
script requeues the job, and the rerun resumes to the losses of the uninterrupted job; a failed run
is not requeued."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from slurm_cluster import SlurmCluster, missing_binaries
from test_multiprocess_train import GLOBAL, LOCAL, free_port, losses_of
from test_train import ROOT, STEP_LINE, as_flags, tiny_overrides

STEPS = 16  # long enough that a signal sent at step 2 lands before the end
SCRIPT = os.path.join("scripts", "slurm", "train.sbatch")
JOB_TIMEOUT = 420  # seconds for one job, requeue included


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One cluster for the session; its daemons are stopped by PID afterwards."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge with apt)")
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (slurmd, and munged's /run/munge)")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        pytest.fail(f"the test SLURM did not start: {e}")
    yield cluster
    cluster.stop()


def job_env(cluster: SlurmCluster, **extra) -> dict:
    """What sbatch passes on to the job (--export=ALL): CPU devices, one per task, and a free
    coordinator port (jax derives one from the job id otherwise, the same in every test cluster)."""
    # The session's compilation cache stays (tests/conftest.py): the four jobs compile the same programs.
    keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: v for k, v in cluster.env.items() if not k.startswith("JAX_") or k in keep}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_COORDINATOR_PORT=str(free_port()))
    env.update(extra)
    return env


def job_flags(token_glob: str, ckpt: str, layout: str) -> list[str]:
    return as_flags(tiny_overrides(token_glob, ckpt, **{
        "step_scheduler.max_steps": STEPS, "step_scheduler.global_batch_size": GLOBAL,
        "step_scheduler.local_batch_size": LOCAL[layout], "step_scheduler.ckpt_every_steps": 8,
        "step_scheduler.val_every_steps": 8, "distributed.heartbeat_timeout_s": 20,
    }))


DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def sbatch(cluster, flags, out_file, env) -> str:
    """`sbatch --ntasks=2 train.sbatch FLAGS`; returns the job id. (Polled by `finish` rather than
    `sbatch --wait`, which looks every few seconds, then only every 32.)"""
    r = cluster.run("sbatch", "--parsable", "--ntasks=2", f"--output={out_file}", SCRIPT, *flags, cwd=ROOT, env=env)
    if r.returncode != 0:
        pytest.fail(f"sbatch: {r.stdout}{r.stderr}\n{cluster.logs()}")
    return r.stdout.strip().split(";")[0]


def finish(cluster, job, out_file) -> int:
    """Wait for the job's final state (a requeued job passes through REQUEUED and PENDING); its exit status."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while cluster.job_state(job) not in DONE:
        if time.monotonic() > deadline:
            cluster.run("scancel", job)
            pytest.fail(f"job {job} still running after {JOB_TIMEOUT} s:\n{read(out_file)[-4000:]}\n{cluster.logs()}")
        time.sleep(0.25)
    return int(cluster.job_field(job, "ExitCode").split(":")[0])


def read(path) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def jobs(slurm, token_glob, tmp_path_factory):
    """Three runs of one config: an uninterrupted 2-task job; the same job sent SIGTERM (scancel) once
    it has logged step 2, which requeues and resumes; one plain process with the same global batch."""
    work = tmp_path_factory.mktemp("jobs")
    ckpt = {name: str(work / name / "ckpt") for name in ("job", "preempted", "single")}
    out = {name: str(work / f"{name}.out") for name in ("job", "preempted")}

    job_id = sbatch(slurm, job_flags(token_glob, ckpt["job"], "two_processes"), out["job"], job_env(slurm))
    single = subprocess.Popen(
        [sys.executable, "-m", "jaxpretrain.train", *job_flags(token_glob, ckpt["single"], "one_device")], cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    codes = {"job": finish(slurm, job_id, out["job"])}

    env = job_env(slurm, JAXPRETRAIN_PYTHON=sys.executable)
    pre_id = sbatch(slurm, job_flags(token_glob, ckpt["preempted"], "two_processes"), out["preempted"], env)
    train_log = os.path.join(ckpt["preempted"], "logs", "train.jsonl")
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (os.path.exists(train_log) and any(json.loads(line)["step"] >= 2 for line in open(train_log))):
        if slurm.job_state(pre_id) in DONE or time.monotonic() > deadline:
            pytest.fail(f"job {pre_id} never reached step 2:\n{read(out['preempted'])[-4000:]}")
        time.sleep(0.1)
    r = slurm.run("scancel", "--signal=TERM", pre_id)
    assert r.returncode == 0, r.stdout + r.stderr
    codes["preempted"] = finish(slurm, pre_id, out["preempted"])
    single_out = single.communicate(timeout=JOB_TIMEOUT)[0]
    assert single.returncode == 0, single_out[-3000:]
    restarts = {"job": slurm.job_field(job_id, "Restarts"), "preempted": slurm.job_field(pre_id, "Restarts")}
    return dict(ckpt=ckpt, out={k: read(v) for k, v in out.items()}, codes=codes, restarts=restarts, ids={"job": job_id, "preempted": pre_id})


def test_sbatch_two_tasks_train_like_one_process_and_exit_0(jobs):
    out = jobs["out"]["job"]
    assert jobs["codes"]["job"] == 0, out[-4000:]
    assert re.search(rf"Processes: launch: SLURM job {jobs['ids']['job']} step 0 \| process 0 of 2 \| local devices 1", out), out[-4000:]
    assert [int(m.group(1)) for m in map(STEP_LINE.search, out.splitlines()) if m] == list(range(1, STEPS + 1))
    assert "exited with status 0 (finished)" in out and "requeue" not in out.replace("--requeue", "")
    assert jobs["restarts"]["job"] == "0"  # a finished run is never requeued
    assert os.path.exists(os.path.join(jobs["ckpt"]["job"], str(STEPS), "commit_success.txt"))
    for kind in ("train", "validation"):
        got, want = losses_of(jobs["ckpt"]["job"], kind), losses_of(jobs["ckpt"]["single"], kind)
        assert sorted(got) == sorted(want) and want, kind
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=2e-5, err_msg=kind)


def test_scancel_term_saves_requeues_and_resumes_to_the_same_losses(jobs):
    out, pre_id = jobs["out"]["preempted"], jobs["ids"]["preempted"]
    assert jobs["codes"]["preempted"] == 0, out[-4000:]
    stopped = re.search(r"SIGTERM: saved step (\d+), exiting", out)
    assert stopped, out[-4000:]
    stop = int(stopped.group(1))
    assert 2 < stop < STEPS
    assert f"stopped after saving a checkpoint; requeueing job {pre_id}" in out
    assert "(restart 1), 2 task(s)" in out and sys.executable in out  # JAXPRETRAIN_PYTHON was used
    assert f"Resumed from {jobs['ckpt']['preempted']}/{stop} at step {stop}" in out
    assert jobs["restarts"]["preempted"] == "1"
    # Every step's loss, before and after the requeue, is the uninterrupted job's, bit for bit.
    assert losses_of(jobs["ckpt"]["preempted"], "train") == losses_of(jobs["ckpt"]["job"], "train")


def test_a_failed_run_is_not_requeued(slurm, tmp_path):
    out_file = str(tmp_path / "bad.out")
    flags = ["--config", "configs/gpt2.py:tiny", "--config.step_scheduler.max_steps=0", f"--config.checkpoint.checkpoint_dir={tmp_path}/ckpt"]
    job = sbatch(slurm, flags, out_file, job_env(slurm))
    code = finish(slurm, job, out_file)
    out = read(out_file)
    # The task that failed first exits 2; srun (--kill-on-bad-exit) may end the other, still starting,
    # with SIGTERM, and the job's status is then the highest of the two: 143.
    assert code in (2, 143), out
    assert "error: step_scheduler.max_steps" in out and f"exited with status {code} (failed: not requeued)" in out
    assert slurm.job_field(job, "Restarts") == "0" and slurm.job_state(job) == "FAILED"


def test_slurm_gpus_per_task():
    """Which GPUs a task drives, from SLURM's variables (the rule is in processes.slurm_local_device_ids)."""
    from jaxpretrain.processes import slurm_local_device_ids

    def ids(tasks_per_node, localid, visible=None, node=0):
        env = {"SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(node)}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        return slurm_local_device_ids(env)

    assert ids("1(x2)", 0, "0,1,2,3,4,5,6,7") is None  # one task per node: all its GPUs
    assert ids("8(x2)", 3, "0,1,2,3,4,5,6,7") == [3]  # one task per GPU, unbound: GPU SLURM_LOCALID
    assert ids("8(x2)", 3, "3") is None  # one task per GPU, bound by SLURM: the one it sees
    assert ids("2", 1, "0,1,2,3,4,5,6,7") == [4, 5, 6, 7]  # two tasks sharing 8 GPUs: 4 each
    assert ids("8", 5) == [5]  # GPUs not listed: jax's rule
    assert ids("4,2", 1, "0,1", node=1) == [1]  # uneven nodes: this node's count
