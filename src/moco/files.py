"""Writing files so that a crash never leaves a partial one: the one atomic write every writer uses."""

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFull


def atomic_write(path: str | Path, write: Callable[[Path], object],
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write `path` through `write(tmp)`: a temporary file in the same folder, fsynced, optionally `check`ed,
    renamed into place, and the folder fsynced so that the rename itself is durable.

    A crash at any moment leaves either the previous file or the new one, never a partial one; a failed
    write or check leaves the previous file and no temporary file. A full disk is a `DiskFull` error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"the disk is full: could not write {path} ({e.strerror}); the previous {path.name} is "
                           "intact. Free some space (or write elsewhere) and run the command again; a training "
                           "run continues with --resume auto") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
