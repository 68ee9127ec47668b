"""Durable file writing, in one place: atomic replace, directory fsync, syncfs.

Every file litefspy writes goes to a temp name in the same directory, is
fsynced, renamed, and its directory fsynced (`atomic_write`); batches of new
files are made durable with one `syncfs` (`sync_files`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

StrPath = str | os.PathLike[str]

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def fsync_dir(path: StrPath) -> None:
    """fsync a directory so a rename or unlink inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: StrPath) -> Iterator[BinaryIO]:
    """Yield a file that replaces `path` only if the block completes.

    Readers see either the old file or the complete new one, never a partial
    write, and the new file is durable once the block has exited.
    """
    target = Path(path)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; LTX files and databases are ordinary shared files.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def install(tmp: StrPath, final: StrPath, *, sync_file: bool = True) -> None:
    """Rename a finished temp file over `final` durably: fsync it (unless the writer
    already did), rename, fsync the directory."""
    if sync_file:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def syncfs(fd: int) -> None:
    """syncfs(2): flush every dirty file and directory entry of fd's filesystem.

    One call makes a batch of new LTX files (data and names) durable with a
    single journal commit, where fsync per file and per directory would cost one
    commit each.
    """
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sync_files(paths: list[Path], directory: Path) -> None:
    """Make the files (and their names in `directory`) durable."""
    if not paths:
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)
