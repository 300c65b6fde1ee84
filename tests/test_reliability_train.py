"""Faults of a real training run, each through the train CLI in its own process: SIGKILL at random
moments (one during an async checkpoint write), Ctrl-C once and twice, a NaN from a huge learning
rate (stop, or skip), a disk that fills up or turns read-only while saving, a step that cannot fit
in device memory, and token files that do not match the model. The reference for every resumed run
is the uninterrupted run: the same losses, bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxpretrain.data.indexed import IndexedDatasetBuilder
from jaxpretrain.train.preemption import EXIT_STOPPED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"\| step (\d+) \| epoch \d+ \| loss (\S+) \| grad_norm (\S+) \|")
RESUMED = re.compile(r"Resumed from (\S+) at step (\d+) \(([^)]*)\)")
VOCAB = 512  # a small vocabulary: checkpoints of ~1.5 MB, quick to write and to fill a disk with
SEQ = 32
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Token files (two prefixes of random ids below VOCAB) and a JAX compilation cache shared by
    every run of this module, so a restart costs its imports, not a recompilation."""
    root = tmp_path_factory.mktemp("reliability")
    rng = np.random.default_rng(0)
    for i in range(2):
        lengths = rng.integers(20, 200, 300)
        with IndexedDatasetBuilder(str(root / f"tok_{i}_text_document.bin"), dtype=np.uint16) as b:
            b.add_documents(rng.integers(0, VOCAB, int(lengths.sum())), lengths)
            b.finalize(str(root / f"tok_{i}_text_document.idx"))
    return root


def flags(work, ckpt, **extra) -> list[str]:
    o = {
        "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.n_positions": 64, "model.vocab_size": VOCAB,
        "model.dropout": 0.1,  # on: a resumed run must replay the same masks
        "dataset.paths": str(work / "tok_*_text_document*"), "validation_dataset.paths": str(work / "tok_*_text_document*"),
        "dataset.index_mapping_dir": str(work / "index_cache"), "validation_dataset.index_mapping_dir": str(work / "index_cache"),
        "dataset.seq_length": SEQ, "validation_dataset.seq_length": SEQ,
        "dataset.split": "0.9, 0.1, 0.0", "validation_dataset.split": "0.9, 0.1, 0.0",
        "validation_dataset.num_val_samples": 16,
        "step_scheduler.global_batch_size": 8, "step_scheduler.local_batch_size": 4,
        "step_scheduler.max_steps": 24, "step_scheduler.val_every_steps": 5, "step_scheduler.ckpt_every_steps": 2,
        "lr_scheduler.lr_warmup_steps": 3, "logging.log_every_steps": 1, "checkpoint.max_to_keep": 2,
        "checkpoint.checkpoint_dir": str(ckpt),
    }
    o.update(extra)
    return ["--config", "configs/gpt2.py:tiny"] + [f"--config.{k}={v}" for k, v in o.items()]


def env(work) -> dict:
    return {
        **os.environ, "JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def train(work, ckpt, *extra, timeout=300, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxpretrain.train", *flags(work, ckpt, **overrides), *extra],
        cwd=ROOT, env=env(work), capture_output=True, text=True, timeout=timeout,
    )


class Run:
    """A train CLI process whose output is read by a thread, so the test can wait on lines or on the
    file system while the process runs, and kill it at that moment."""

    def __init__(self, work, ckpt, **overrides):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "jaxpretrain.train", *flags(work, ckpt, **overrides)],
            cwd=ROOT, env=env(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def steps(self) -> list[int]:
        return [int(m.group(1)) for m in map(STEP.search, list(self.lines)) if m]

    def wait_for(self, condition, timeout=240.0, poll=0.001) -> bool:
        """Poll `condition()` until true (True) or the process ends first (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            if self.proc.poll() is not None:
                return bool(condition())
            time.sleep(poll)
        raise TimeoutError("".join(self.lines[-40:]))

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout=240.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def logged_losses(ckpt) -> dict[int, float]:
    """Every step of `<ckpt>/logs/train.jsonl`, which must name each step once."""
    with open(os.path.join(ckpt, "logs", "train.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def on_disk(ckpt) -> tuple[list[int], list[int]]:
    """(complete steps, steps with a temporary directory a killed save left)."""
    names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
    complete = sorted(int(n) for n in names if n.isdigit())
    partial = sorted(int(n.split(".")[0]) for n in names if TMP_SUFFIX in n)
    return complete, partial


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stdout[-2000:] + r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def baseline(work, tmp_path_factory):
    """The uninterrupted run: its losses are the reference of every resumed run here."""
    ckpt = tmp_path_factory.mktemp("baseline") / "ckpt"
    r = train(work, ckpt)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = logged_losses(ckpt)
    assert sorted(losses) == list(range(1, 25))
    # checkpoint.max_to_keep=2 of the twelve saves, the older ones removed (none left half-deleted)
    assert on_disk(ckpt) == ([22, 24], [])
    trash = ckpt / ".deleted"
    assert not trash.exists() or not os.listdir(trash), os.listdir(trash)
    return losses


# -- SIGKILL at random moments ------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume_gives_identical_losses(work, baseline, tmp_path):
    """Five SIGKILLs (at a random moment of start-up, mid-step, mid-validation, right as an async
    checkpoint write starts, and at a random moment of training), each followed by a restart: every
    restart resumes from the newest complete checkpoint it says it took, never a partial one, and
    the final run logs the uninterrupted run's losses for every step."""
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    ckpt = tmp_path / "ckpt"
    context = f"(RELIABILITY_SEED={seed})"

    # Each moment lets a run add a few steps at most, so that the five runs together stay short of
    # max_steps and the final run has steps left to resume (a step takes some 50 ms here).
    def after_start(run):  # anywhere in imports, index build, compile, or the first steps
        end = time.monotonic() + rng.uniform(0.5, 8.0)
        run.wait_for(lambda: time.monotonic() >= end or len(run.steps()) >= 3)

    def mid_step(run):
        first = run.steps()[-1] if run.steps() else 0
        run.wait_for(lambda: len(run.steps()) > 0 and run.steps()[-1] >= first + rng.randint(1, 3))
        time.sleep(rng.uniform(0.0, 0.05))

    def mid_validation(run):  # the step line of a validation step is printed just before validation
        run.wait_for(lambda: any(s % 5 == 0 for s in run.steps()))

    def checkpoint_write(run):  # the moment a save's temporary directory appears
        seen = set(os.listdir(ckpt)) if ckpt.exists() else set()
        run.wait_for(lambda: ckpt.exists() and any(TMP_SUFFIX in n and n not in seen for n in os.listdir(ckpt)))

    def during_training(run):
        run.wait_for(lambda: bool(run.steps()))
        first, end = run.steps()[-1], time.monotonic() + rng.uniform(0.0, 1.5)
        run.wait_for(lambda: time.monotonic() >= end or run.steps()[-1] >= first + 3)

    moments = [mid_step, mid_validation, checkpoint_write, during_training]
    rng.shuffle(moments)
    moments = [after_start] + moments
    def check_resume(run, complete, partial):
        """The run started from the newest checkpoint complete at its launch, naming the partial ones."""
        resumed = [m for m in map(RESUMED.search, run.lines) if m]
        if not complete:
            assert not resumed, (run.output[-3000:], context)
            return
        assert resumed, (run.output[-3000:], context)
        where, step, why = resumed[0].group(1), int(resumed[0].group(2)), resumed[0].group(3)
        assert step == complete[-1] and where == str(ckpt / str(step)), (run.output[-3000:], context)
        assert why.startswith("newest complete checkpoint"), why
        for k in partial:
            assert re.search(rf"\b{k}\b.*incomplete and ignored", why), (why, context)
        steps = run.steps()
        assert not steps or steps[0] == step + 1, (steps, context)

    killed_mid_write = 0
    complete, partial = [], []
    for moment in moments:
        run = Run(work, ckpt)
        moment(run)
        run.kill()
        assert run.finish() == -signal.SIGKILL, run.output[-3000:]
        check_resume(run, complete, partial)
        complete, partial = on_disk(ckpt)
        if moment is checkpoint_write and partial:
            killed_mid_write += 1
        steps = run.steps()
        print(f"killed {moment.__name__}: last step line {steps[-1] if steps else '-'}, then on disk: "
              f"complete {complete}, partial {partial} {context}")

    final = Run(work, ckpt)
    assert final.finish() == 0, final.output[-3000:]
    check_resume(final, complete, partial)
    assert final.steps()[-1] == 24
    logged = {int(m.group(1)): float(m.group(2)) for m in map(STEP.search, final.lines) if m}
    assert all(f"{baseline[s]:.4f}" == f"{loss:.4f}" for s, loss in logged.items()), context
    assert logged_losses(ckpt) == baseline, context  # every step, once, bit for bit
    assert killed_mid_write >= 1, f"the checkpoint-write kill came too late to leave a partial save {context}"


# -- Ctrl-C --------------------------------------------------------------------------------------------


def test_ctrl_c_saves_and_exits_like_sigterm_and_the_rerun_resumes(work, baseline, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = Run(work, ckpt, **{"step_scheduler.ckpt_every_steps": 100})
    run.wait_for(lambda: 3 in run.steps())
    run.kill(signal.SIGINT)
    assert run.finish() == EXIT_STOPPED, run.output[-3000:]  # as after SIGTERM: stopped, saved, to be resumed
    saved = re.search(r"SIGINT: saved step (\d+), exiting", run.output)
    assert saved, run.output[-3000:]
    assert "press Ctrl-C again to exit at once" in run.output
    stop = int(saved.group(1))
    assert on_disk(ckpt)[0] == [stop]
    r = train(work, ckpt, **{"step_scheduler.ckpt_every_steps": 100})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at step {stop} (newest complete checkpoint)" in r.stdout
    assert logged_losses(ckpt) == baseline


def test_preemption_signal_names_the_signal_that_saves_and_exits(work, baseline, tmp_path):
    """NeMo's step_scheduler.preemption_signal: with SIGUSR1 (SLURM's `--signal=USR1@300`, say), that
    signal saves and exits 75 and the rerun resumes the uninterrupted losses."""
    ckpt = tmp_path / "ckpt"
    flags = {"step_scheduler.ckpt_every_steps": 100, "step_scheduler.preemption_signal": "SIGUSR1"}
    run = Run(work, ckpt, **flags)
    run.wait_for(lambda: 3 in run.steps())
    run.kill(signal.SIGUSR1)  # without the handler, SIGUSR1's default action ends the process (-10)
    assert run.finish() == EXIT_STOPPED, run.output[-3000:]
    saved = re.search(r"SIGUSR1: saved step (\d+), exiting", run.output)
    assert saved, run.output[-3000:]
    stop = int(saved.group(1))
    assert on_disk(ckpt)[0] == [stop]
    r = train(work, ckpt, **flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert logged_losses(ckpt) == baseline


def test_second_ctrl_c_exits_at_once(work, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = Run(work, ckpt)
    run.wait_for(lambda: 1 in run.steps())
    run.kill(signal.SIGINT)
    run.wait_for(lambda: "press Ctrl-C again" in run.output)
    run.kill(signal.SIGINT)
    # Ended by the signal itself (Python's default SIGINT action, not a clean exit after a save); the
    # timeout only guards against a hang (a run that kept saving would finish in a few seconds too).
    rc = run.finish(timeout=60)
    assert rc == -signal.SIGINT, run.output[-3000:]
    assert "saved step" not in run.output  # the first Ctrl-C's "SIGINT: saved step N, exiting" never came


# -- non-finite losses ---------------------------------------------------------------------------------

def huge_lr(lr: float) -> dict:
    return {"optimizer.lr": lr, "lr_scheduler.init_lr": lr, "lr_scheduler.lr_warmup_steps": 0}


@pytest.fixture(scope="module")
def healthy_run(work, tmp_path_factory):
    """A run of 4 healthy steps: its checkpoint (step 4) is the last good one of the next tests."""
    ckpt = tmp_path_factory.mktemp("healthy") / "ckpt"
    r = train(work, ckpt, **{"step_scheduler.max_steps": 4})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert on_disk(ckpt)[0] == [2, 4]
    return ckpt


@pytest.fixture
def good_checkpoint(healthy_run, tmp_path):
    """A fresh copy of the healthy run's checkpoint directory for one test."""
    import shutil

    return shutil.copytree(healthy_run, tmp_path / "ckpt")


@pytest.mark.parametrize(
    "lr, bad_step, what",
    [
        # Step 5's update throws the weights far off (still finite); step 6's loss is NaN. Step 6 is
        # a checkpoint step (every 2): the NaN is seen before its save, which never happens.
        (1e30, 6, "loss nan / grad_norm nan is not finite"),
        # An infinite learning rate: step 5's loss and gradients are fine, its update is not. The
        # check before saving step 5 finds the non-finite weights.
        (1e39, 5, "the parameters or optimizer state are not finite after the update"),
    ],
    ids=["nan_loss", "weights_overflow"],
)
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(work, good_checkpoint, lr, bad_step, what):
    ckpt = good_checkpoint
    r = train(work, ckpt, **huge_lr(lr), **{"step_scheduler.ckpt_every_steps": 1 if bad_step == 5 else 2})
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_error_line(r)
    assert line.startswith(f"error: step {bad_step}: {what}; stopped without saving"), line
    assert line.endswith("the last checkpoint, step 4, is kept and a rerun resumes from it"), line
    assert on_disk(ckpt) == ([2, 4], [])
    assert all_finite_on_disk(ckpt) == {2: True, 4: True}  # the NaN never reached a checkpoint
    # The last good checkpoint resumes: with a healthy learning rate, from step 4, on the same data
    # (step 5's loss is computed before its update, so it equals the blown-up run's).
    blown = {int(m.group(1)): m.group(2) for m in map(STEP.search, r.stdout.splitlines()) if m}
    again = train(work, ckpt, **{"step_scheduler.max_steps": 6})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "at step 4 (newest complete checkpoint)" in again.stdout
    # max_steps 4 -> 6: the resumed run says how its schedule differs from the checkpoint's.
    assert "Schedule changed since the checkpoint: decay_steps 4 -> 6; the config's values apply from step 5 on" in again.stdout
    healthy = {int(m.group(1)): m.group(2) for m in map(STEP.search, again.stdout.splitlines()) if m}
    assert healthy[5] == blown[5] and sorted(healthy) == [5, 6]


def test_another_global_batch_resumes_at_the_next_sample_or_is_one_error(work, healthy_run, tmp_path):
    """The data position counts global batches. Resumed with a global batch of 16 after 4 steps of 8,
    the run continues at sample 32, as Megatron's sampler continues from its consumed samples: with a
    negligible lr (the weights stay the step-4 ones) and dropout off, each step's loss is the mean of
    two steps' losses of a resume that keeps batches of 8. A batch that 32 samples do not fill
    exactly (12), or a smaller one, is one error before any data work."""
    import shutil

    still = {**huge_lr(1e-12), "model.dropout": 0.0, "step_scheduler.ckpt_every_steps": 100}
    kept = train(work, shutil.copytree(healthy_run, tmp_path / "kept"), **still, **{
        "step_scheduler.max_steps": 8, "step_scheduler.local_batch_size": 2})
    assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-3000:]
    moved_dir = shutil.copytree(healthy_run, tmp_path / "moved")
    moved = train(work, moved_dir, **still, **{"step_scheduler.max_steps": 6, "step_scheduler.global_batch_size": 16})
    assert moved.returncode == 0, moved.stdout[-3000:] + moved.stderr[-3000:]
    assert "Global batch 8 -> 16 since the checkpoint: the data continues at sample 32, as Megatron" in moved.stdout
    a, b = logged_losses(tmp_path / "kept"), logged_losses(moved_dir)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[5], b[6]], [(a[5] + a[6]) / 2, (a[7] + a[8]) / 2], rtol=1e-5)
    assert abs(a[5] - a[7]) > 1e-3  # the samples differ: a test of something

    bad = train(work, shutil.copytree(healthy_run, tmp_path / "bad"), **{"step_scheduler.global_batch_size": 12, "step_scheduler.max_steps": 6})
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
    line = one_error_line(bad)
    assert line.startswith(f"error: step_scheduler.global_batch_size: the checkpoint at {tmp_path / 'bad'}/4 was trained with 8, "
                           "this config 12; its 32 consumed samples (4 batches x 8) are not a whole number of batches of 12"), line
    assert "Train data:" not in bad.stdout and on_disk(tmp_path / "bad") == ([2, 4], [])
    # Changed twice: the moved run's step 6 has read 4 batches of 16 (64 samples, not 6 x 16), so
    # batches of 32 go on at sample 64; batches of 8 would need batch 8 of a 7-step run's 7: refused.
    again = train(work, moved_dir, **still, **{"step_scheduler.max_steps": 7, "step_scheduler.global_batch_size": 32})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Global batch 16 -> 32 since the checkpoint: the data continues at sample 64, as Megatron" in again.stdout
    shrink = train(work, moved_dir, **{"step_scheduler.max_steps": 8})
    assert shrink.returncode == 2 and "the global batch may grow on resume, not shrink" in one_error_line(shrink)


def test_nonfinite_steps_are_skipped_up_to_the_limit_each_logged(work, good_checkpoint):
    r = train(work, good_checkpoint, **huge_lr(1e30), **{"optimizer.skip_nonfinite_steps": 2, "step_scheduler.ckpt_every_steps": 100})
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    skipped = re.findall(r"step (\d+): loss \S+ / grad_norm \S+ is not finite: update skipped \((\d) of at most 2 in a row\)", r.stdout)
    assert skipped == [("6", "1"), ("7", "2")], r.stdout[-3000:]
    line = one_error_line(r)
    assert line.startswith("error: step 8: ") and "3 steps in a row" in line, line
    assert "the last checkpoint, step 4, is kept" in line


def all_finite_on_disk(ckpt) -> dict[int, bool]:
    """step -> whether every float of its parameters and optimizer state is finite, read by Orbax."""
    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(str(ckpt), options=ocp.CheckpointManagerOptions(read_only=True))
    out = {}
    for step in manager.all_steps():
        items = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore()))
        leaves = [np.asarray(x) for x in jax.tree.leaves([items["params"], items["opt_state"]])]
        out[step] = all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
    manager.close()
    return out


# -- disk full, directory read-only ---------------------------------------------------------------------


@pytest.fixture
def small_mount(tmp_path):
    """A tmpfs of 2.5 MB (one checkpoint of this model fits, two do not); unmounted afterwards."""
    where = tmp_path / "small_disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_checkpoint_directory_full_or_read_only_keeps_the_previous_checkpoint(work, baseline, small_mount, tmp_path, fault):
    ckpt = small_mount / "ckpt"
    logs = {"logging.run_dir": str(tmp_path / "logs"), "checkpoint.max_to_keep": 3, "step_scheduler.ckpt_every_steps": 4}
    if fault == "disk_full":  # the first checkpoint (step 4) fits, the second does not
        r = train(work, ckpt, **logs)
        kept = 4
    else:  # room enough, but the directory turns read-only once the first checkpoint is saved
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_mount)], check=True)
        run = Run(work, ckpt, **logs)
        run.wait_for(lambda: on_disk(ckpt)[0] == [4])
        run.kill(signal.SIGSTOP)  # frozen while the directory turns read-only: no race with the next save
        try:
            subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
            kept = on_disk(ckpt)[0][-1]
        finally:
            run.kill(signal.SIGCONT)
        rc = run.finish()
        r = subprocess.CompletedProcess(run.proc.args, rc, run.output, run.output)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_error_line(r)
    problem = "No space left on device" if fault == "disk_full" else "Read-only file system"
    assert line.startswith(f"error: {ckpt}: cannot write checkpoint step {kept + 4} ({problem}); "), line
    assert f"the newest complete checkpoint, step {kept}, is intact" in line, line
    complete, _ = on_disk(ckpt)
    assert complete[-1] == kept

    # Space is back (or the directory writable again): the rerun resumes from that step, bit for bit.
    subprocess.run(["mount", "-o", "remount,rw,size=64m", str(small_mount)], check=True)
    r = train(work, ckpt, **logs)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = RESUMED.search(r.stdout)
    assert m and m.group(2) == str(kept), r.stdout[-3000:]
    with open(tmp_path / "logs" / "train.jsonl") as f:
        got = {rec["step"]: rec["loss"] for rec in map(json.loads, f)}
    assert got == baseline


# -- device memory --------------------------------------------------------------------------------------


def test_step_that_cannot_fit_fails_before_step_1_with_the_estimate(work, tmp_path):
    limit_gib = 1 / 1024  # 1 MiB: this step needs a few
    r = train(work, tmp_path / "ckpt", **{"distributed.device_memory_gib": limit_gib})
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_error_line(r)
    m = re.search(r"needs about (\d+\.\d+) MiB per device \(state and batch .*\), more than the 1\.0 MiB cpu can give", line)
    assert m and line.startswith("error: step_scheduler.local_batch_size: "), line
    assert "model.remat" in line and "distributed.dp_size" in line
    assert not STEP.search(r.stdout)  # before step 1
    assert not (tmp_path / "ckpt").exists(), "nothing is written for a run that cannot start"
    # (A limit the step fits passes: test_reliability_units.py::test_memory_check_against_an_injected_limit.)


# -- token files that do not match the model, through the CLI -----------------------------------------


def _damaged(work, tmp_path, kind) -> str:
    import shutil

    d = tmp_path / "tok"
    d.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(work / f"tok_0_text_document{ext}", d / f"tok_0_text_document{ext}")
    prefix = str(d / "tok_0_text_document")
    if kind == "out_of_vocabulary":
        with open(prefix + ".bin", "r+b") as f:
            f.seek(1000)
            f.write(np.uint16(VOCAB + 7).tobytes())
        return prefix + ".bin", f"largest token id {VOCAB + 7} >= the model's vocabulary size {VOCAB}"
    if kind == "truncated_bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".bin") - 10)
        return prefix + ".bin", "data file truncated"
    if kind == "uint8_for_a_big_vocabulary":
        ids = np.random.default_rng(1).integers(0, 200, 20000)
        os.remove(prefix + ".bin")
        os.remove(prefix + ".idx")
        with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint8) as b:
            b.add_documents(ids, [100] * 200)
            b.finalize(prefix + ".idx")
        return prefix + ".idx", f"dtype uint8 holds ids up to 255, but the model's vocabulary has {VOCAB} tokens"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["out_of_vocabulary", "truncated_bin", "uint8_for_a_big_vocabulary"])
def test_bad_token_files_are_one_line_naming_the_file(work, tmp_path, kind):
    path, expected = _damaged(work, tmp_path, kind)
    prefix = path[:-4]
    r = train(work, tmp_path / "ckpt", **{"dataset.paths": prefix, "validation_dataset.paths": prefix}, timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    line = one_error_line(r)
    assert line.startswith(f"error: {path}: ") and expected in line, line
    assert not (tmp_path / "ckpt").exists(), "nothing is written for a run that cannot start"
