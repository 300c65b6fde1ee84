"""One error type for problems the user can fix, and the CLI wrapper that prints them as one line.

Library code raises `UserError("path/to/file: what is wrong")`; every CLI entry point runs through
`run_cli`, so a user sees `error: path/to/file: what is wrong` and exit status 2, never a traceback.
Bugs (any other exception) still show their traceback: those are ours to fix, not the user's.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


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
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
