"""XLA flags that speed up training on NVIDIA GPUs, set as defaults before the XLA backend starts.

XLA reads `XLA_FLAGS` once, when the first backend is created, so the CLIs call `configure()` before
they touch a device. Each default is added only when the user's own `XLA_FLAGS` does not name that
flag: the user's value always wins. Nothing is added on machines without a CUDA plugin for jax,
when `JAX_PLATFORMS` rules out the GPU, or when `JAXPRETRAIN_XLA_DEFAULTS=0` (the A/B switch of
`scripts/gpu_bench.sh`). Defaults, as of jaxlib 0.10/0.11 (XLA's own defaults in brackets):
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys

# (flag, value, why). Only flags that exist in jaxlib >= 0.10: an unknown flag makes XLA abort.
GPU_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    (
        "--xla_gpu_enable_latency_hiding_scheduler", "true",
        "[false] schedule collectives (FSDP all-gathers, gradient reduce-scatters) to overlap compute",
    ),
)
# Left at XLA's defaults, and A/B'd by `scripts/gpu_bench.sh` (candidates for GPU_DEFAULTS once
# measured): command buffers (CUDA graphs; on in XLA for fusions, cuBLAS, cuDNN and custom calls),
# adding while loops to them, Triton GEMMs, pipelined collectives and while-loop double buffering.

__doc__ += "\n".join(f"  {flag}={value}: {why}" for flag, value, why in GPU_DEFAULTS) + "\n"

ENV_SWITCH = "JAXPRETRAIN_XLA_DEFAULTS"


def flag_names(xla_flags: str) -> set[str]:
    """The flag names (`--name`) set in an XLA_FLAGS string."""
    return {tok.split("=", 1)[0] for tok in shlex.split(xla_flags) if tok.startswith("--")}


def merged_flags(user_flags: str, defaults=GPU_DEFAULTS) -> str:
    """The user's XLA_FLAGS with each default appended unless the user already set that flag."""
    names = flag_names(user_flags)
    added = [f"{flag}={value}" for flag, value, _ in defaults if flag not in names]
    return " ".join([user_flags.strip()] + added).strip() if added else user_flags


def gpu_expected(environ=os.environ) -> bool:
    """Whether jax will start a CUDA backend here (judged without starting one)."""
    platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", "")).lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    plugins = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")
    return any(_module_exists(name) for name in plugins)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing
        return False


def backend_started() -> bool:
    """True once jax has created a backend (too late for XLA_FLAGS to take effect)."""
    xb = sys.modules.get("jax._src.xla_bridge")  # not imported: jax has not started either
    return xb is not None and bool(xb.backends_are_initialized())


def configure(environ=os.environ) -> str | None:
    """Add the GPU defaults to `environ["XLA_FLAGS"]` where they apply; returns the new value or None."""
    if environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not gpu_expected(environ):
        return None
    if backend_started():
        print("warning: jaxpretrain.xla_env.configure() ran after jax started; XLA flags unchanged", file=sys.stderr)
        return None
    environ["XLA_FLAGS"] = merged_flags(environ.get("XLA_FLAGS", ""))
    return environ["XLA_FLAGS"]
