"""GPU XLA flag defaults: the user's XLA_FLAGS win, nothing is added off-GPU, and XLA itself accepts them."""

import os
import subprocess
import sys

from jaxpretrain import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_flags_win_and_defaults_are_added():
    flag, value, _ = xla_env.GPU_DEFAULTS[0]
    assert xla_env.merged_flags("") == f"{flag}={value}"
    mine = f"--xla_dump_to=/tmp/x {flag}=false"
    assert xla_env.merged_flags(mine) == mine  # the user's own value is kept, nothing appended twice
    assert xla_env.merged_flags("--xla_dump_to='/tmp/a b'") == f"--xla_dump_to='/tmp/a b' {flag}={value}"


def test_configure_only_where_a_gpu_backend_will_start(monkeypatch):
    monkeypatch.setattr(xla_env, "backend_started", lambda: False)
    monkeypatch.setattr(xla_env, "gpu_expected", lambda environ: True)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_env.configure(env) == env["XLA_FLAGS"] and xla_env.GPU_DEFAULTS[0][0] in env["XLA_FLAGS"]
    off = {xla_env.ENV_SWITCH: "0"}
    assert xla_env.configure(off) is None and "XLA_FLAGS" not in off
    monkeypatch.undo()
    assert not xla_env.gpu_expected({"JAX_PLATFORMS": "cpu"})


def test_xla_parses_every_default():
    """An unknown flag makes XLA abort at start-up: start a backend with all of them set."""
    flags = xla_env.merged_flags("")
    r = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.devices())"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
