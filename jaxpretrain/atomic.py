"""Files that appear whole or not at all, whenever the writer dies."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def usual_mode(path: str) -> None:
    """Give a temp file (mkstemp: 0600) or directory (mkdtemp: 0700), and every file inside the latter,
    the mode a plain open()/mkdir() would have: outputs renamed into place stay readable by the
    user's group as their other files are (on a shared cluster, teammates read exports and caches)."""
    mask = _umask()
    if os.path.isdir(path):
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def make_writable_dir(directory: str) -> None:
    """Create `directory` if needed and prove it writable (a temp file made and removed there): what an
    output directory needs before minutes of work go into it. Raises OSError otherwise."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def save_atomic(path: str, write: Callable) -> None:
    """`write(file)` into a temp file next to `path`, then rename it over `path`: readers see all of
    the file or none of it (no fsync: what is written this way can be rebuilt after a power loss)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
