"""One node per data.dir: an exclusive lock on `<data.dir>/lock`, held for the node's life.

Two nodes on one data.dir would both believe they own its databases (same
node id, both primary with a static lease) and one's acknowledged writes would
be lost. The lock is taken before anything in the directory is touched and is
released by the kernel however the process ends, so a crash never leaves a
stale lock behind; the file itself only says who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from litefspy.errors import LitefspyError

LOCK_NAME = "lock"


class DataDirInUse(LitefspyError):
    """Another process holds the data directory."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory's lock; return the descriptor that holds it (keep it open)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LitefspyError(f"cannot use data.dir {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DataDirInUse(
                f"data.dir {data_dir} is in use by pid {holder}; stop that node first or "
                "give this one its own data.dir"
            ) from None
        raise LitefspyError(f"cannot lock data.dir {data_dir}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
