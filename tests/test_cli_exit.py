"""`errors.exit_now`, the CLIs' exit without the interpreter's teardown: the status, the output and the
atexit handlers are those of a normal exit, and a thread still running is waited for."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

PROGRAM = """
import atexit, sys, threading, time
import jax  # the fast exit applies once jax is loaded
from jaxpretrain.errors import run_cli, UserError

atexit.register(lambda: print("atexit handler ran", flush=False))

def main(argv):
    print("buffered output", end="")  # no newline, no flush: the exit must flush it
    if argv == ["thread"]:
        threading.Thread(target=lambda: (time.sleep(1.0), print(" | thread finished", end=""))).start()
    if argv == ["user_error"]:
        raise UserError("some/file: what is wrong")
    return 3

run_cli(main, sys.argv[1:])
"""


@pytest.mark.parametrize("full_exit", ["0", "1"], ids=["fast_exit", "full_exit"])
@pytest.mark.parametrize("case, status, stdout", [
    ("plain", 3, "buffered outputatexit handler ran\n"),
    ("thread", 3, "buffered output | thread finishedatexit handler ran\n"),
    ("user_error", 2, "buffered outputatexit handler ran\n"),
], ids=["plain", "thread", "user_error"])
def test_exit_keeps_status_output_handlers_and_threads(case, status, stdout, full_exit):
    r = subprocess.run(
        [sys.executable, "-c", PROGRAM, case], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu", "JAXPRETRAIN_FULL_EXIT": full_exit},
    )
    assert (r.returncode, r.stdout) == (status, stdout), r.stderr[-2000:]
    if case == "user_error":
        assert r.stderr.strip().splitlines()[-1] == "error: some/file: what is wrong"
