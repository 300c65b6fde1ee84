"""The benchmark CLIs on a tiny shape: their report, the JSON line, the last `<X> tokens/s` line."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_module

TINY = [
    "--config", "configs/gpt2.py:tiny", "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.n_head=2",
    "--config.model.vocab_size=256", "--config.model.n_positions=32", "--config.dataset.seq_length=16",
    "--config.step_scheduler.global_batch_size=4", "--config.step_scheduler.local_batch_size=2",
    "--steps", "2", "--warmup", "1", "--json",
]
FIELDS = {"compile_s", "step_ms", "tokens_per_s", "tokens_per_s_per_device", "flops_per_token", "mfu", "peak_mem_gib", "loss"}


def _check(out: str, bench: str) -> dict:
    lines = out.strip().splitlines()
    assert re.fullmatch(r"\d+\.\d{2} tokens/s", lines[-1]), lines[-1]
    assert lines[-2].startswith('{"bench":')  # the JSON line comes right before the last line
    result = json.loads(lines[-2])
    assert result["bench"] == bench and FIELDS <= set(result)
    assert float(lines[-1].split()[0]) == pytest.approx(result["tokens_per_s"], abs=0.006)
    assert result["grad_accum"] == 2 and result["seq"] == 16
    assert any("6N + 12*L*H*Q*T" in line for line in lines)  # the MFU formula is stated
    return result


def test_bench_reports_and_profiles(tmp_path):
    r = run_module("jaxpretrain.bench", *TINY, "--profile", str(tmp_path / "trace"), "--profile-steps", "1", "--top", "5", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = _check(r.stdout, "jaxpretrain")
    assert result["compile_s"] > 0 and len(result["profile_top_ops"]) == 5
    assert result["attention_kernels"] == ["xla"]  # no cuDNN custom call on a CPU
    assert "| op | kind | ms/step | share | calls/step |" in r.stdout


def test_torch_baseline_reports_the_same_fields():
    r = run_module("scripts.bench_torch", *TINY, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _check(r.stdout, "torch")


def test_bad_bench_flag_is_one_line():
    r = run_module("jaxpretrain.bench", "--config", "configs/gpt2.py:tiny", "--steps", "x", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == ["error: --steps: 'x' is not a int"]


def test_unwritable_profile_dir_fails_before_compiling(tmp_path):
    blocker = tmp_path / "a_file"  # a file where a directory is wanted (tests may run as root: no chmod tricks)
    blocker.write_text("not a directory")
    r = run_module("jaxpretrain.bench", *TINY, "--steps", "1", "--profile", str(blocker / "trace"), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --profile {blocker / 'trace'}: cannot write the trace there (Not a directory)"
    ]
    assert "compile" not in r.stdout  # no benchmark ran


def test_a_failing_profiler_loses_its_table_not_the_timings(tmp_path):
    """The trace is the part most tied to the machine (CUPTI, a trace layout a new jax changed): when
    summarising it fails, the benchmark still reports its figures, and says why the profile is missing."""
    boom = ("import sys; from jaxpretrain import profiling\n"
            "def top_ops(*a, **k): raise KeyError('no XLA Ops line')\n"
            "profiling.top_ops = top_ops\n"
            "from jaxpretrain.errors import run_cli; from jaxpretrain.bench import main; run_cli(main, sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", boom, *TINY, "--profile", str(tmp_path / "trace"), "--profile-steps", "1"],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = _check(r.stdout, "jaxpretrain")
    assert result["profile_error"] == "KeyError: 'no XLA Ops line'" and "profile_top_ops" not in result
    assert "warning: --profile: KeyError: 'no XLA Ops line'; the timings stand" in r.stderr
    assert "Traceback" not in r.stderr
