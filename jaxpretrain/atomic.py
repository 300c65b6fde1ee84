"""Files that appear whole or not at all, whenever the writer dies."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def save_atomic(path: str, write: Callable) -> None:
    """`write(file)` into a temp file next to `path`, then rename it over `path`: readers see all of
    the file or none of it (no fsync: what is written this way can be rebuilt after a power loss)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
