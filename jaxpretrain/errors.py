"""One error type for problems the user can fix, and the CLI wrapper that prints them as one line.

Library code raises `UserError("path/to/file: what is wrong")`; every CLI entry point runs through
`run_cli`, so a user sees `error: path/to/file: what is wrong` and exit status 2, never a traceback.
Bugs (any other exception) still show their traceback: those are ours to fix, not the user's.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line naming the file or field."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (also a ValueError, for library callers that expect one)."""


def keep_torch_out() -> None:
    """Make torch (and IPython) invisible to this process, so that transformers and flax do not import them.

    Our CLIs use transformers only for configs and tokenizers, yet where torch is installed (most ML
    environments) importing any config class imports torch too (`modeling_rope_utils`): 1-5 s of
    start-up per process, in every process of a multi-process run, for nothing. A `None` entry in
    `sys.modules` makes `importlib.util.find_spec("torch")` answer None (transformers then takes
    torch as absent) and `import torch` raise ImportError. `JAXPRETRAIN_ALLOW_TORCH=1` turns it off.
    IPython the same way: flax's repr helpers import it (0.4 s) only to ask whether they run inside a
    notebook, which a CLI process never does (where IPython is already loaded, it is left alone).
    """
    if "IPython" not in sys.modules:
        sys.modules["IPython"] = None  # type: ignore[assignment]
    if os.environ.get("JAXPRETRAIN_ALLOW_TORCH", "") not in ("", "0") or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI `main(argv)`; a UserError becomes `error: ...` on stderr and exit status 2."""
    # transformers advises "PyTorch was not found" at every import, in every worker process; torch is
    # not needed here (only tokenizers and configs are used), so that advice is noise to our users.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    keep_torch_out()
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        # The one line above is the report. A background write that failed the same way (Orbax's
        # asyncio tasks on a full disk) would otherwise add asyncio's "exception was never
        # retrieved" traceback when its future is collected at exit.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        exit_now(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        exit_now(130)
    except BrokenPipeError:
        # The reader went away (`... --help | head`): nothing left to tell it, and no traceback.
        # stdout is pointed at /dev/null so the interpreter's own final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        exit_now(141)  # a shell's status for a process killed by SIGPIPE
    exit_now(code or 0)


def exit_now(code: int) -> NoReturn:
    """`sys.exit(code)`, minus the interpreter's teardown of JAX when nothing is left to finish.

    A normal exit joins the non-daemon threads, runs the atexit handlers (logging's flush,
    jax.distributed's shutdown, multiprocessing's joins, Orbax's and tensorboardX's own), then
    dismantles every module and native object: 0.8-0.9 s for a process that used JAX (XLA's client
    and its thread pools; measured on a tiny train run on 2 cores), in every process of every run.
    Once the handlers have run and the standard streams are flushed that dismantling writes nothing,
    so `os._exit` ends the process there with the same status. Every file our CLIs write is closed
    before they return. The normal exit is kept where JAX was never imported (nothing to gain),
    while another non-daemon thread still runs (Python would wait for it), in an interactive
    session, and with JAXPRETRAIN_FULL_EXIT=1 (for tools that act at teardown).
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    full = os.environ.get("JAXPRETRAIN_FULL_EXIT", "") not in ("", "0") or sys.flags.interactive or hasattr(sys, "ps1")
    if "jax" not in sys.modules or others or full:
        sys.exit(code)
    _flush_std_streams()
    atexit._run_exitfuncs()  # what a normal exit runs (and would run after this point), in its order
    _flush_std_streams()
    os._exit(code)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`| head`) or a stream closed: nothing left to say
            pass
