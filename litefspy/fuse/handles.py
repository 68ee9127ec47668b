"""Open files: what a file handle the kernel holds refers to."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyfuse3

from litefspy.fuse.copies import StagedCopy
from litefspy.fuse.inodes import Node, NodeKind
from litefspy.store.database import Database
from litefspy.store.types import FileKind


@dataclass
class Handle:
    """An open file: the real descriptor, or the frozen content of a virtual file."""

    node: Node
    db: Database | None
    fd: int = -1
    content: bytes = b""
    copy: StagedCopy | None = None
    # This open created the database file, and a write to it was refused (not
    # SQLite): at close, the empty file is removed rather than left as a database.
    created_db: bool = False
    refused_write: bool = False


class HandleTable:
    """File handle numbers -> open files."""

    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    def add(self, handle: Handle) -> int:
        """A new file handle number for `handle`."""
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def __getitem__(self, fh: int) -> Handle:
        """The open file of `fh`; FUSEError(EBADF) if there is none."""
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    def get(self, fh: int) -> Handle | None:
        return self._handles.get(fh)

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)

    def __iter__(self) -> Iterator[Handle]:
        return iter(self._handles.values())


def file_info(fh: int, kind: NodeKind) -> pyfuse3.FileInfo:
    """Database and -shm: kernel page cache kept. Journal and WAL: direct I/O.

    SQLite writes a WAL frame's page (and a journal record's page) at an offset
    that is not page-aligned; through the page cache the kernel splits every
    such write into two FUSE requests. Journal and WAL are read back only by
    rollback, recovery and WAL readers' frame lookups, so bypassing the cache
    for every handle of those files costs little and saves a request per page.
    All handles of a file use the same mode, so no stale cache can arise.
    """
    if kind in (FileKind.JOURNAL, FileKind.WAL):
        return pyfuse3.FileInfo(fh=fh, direct_io=True)
    return pyfuse3.FileInfo(fh=fh, keep_cache=True)


def wants_write(flags: int) -> bool:
    """Opened for writing."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY


def open_backing(db: Database, kind: FileKind, flags: int) -> int:
    """Open the real file behind a name the kernel believes exists.

    After a database is deleted and recreated, the kernel may still hold
    a cached entry for its old journal or WAL (litefspy removed the file;
    the entry's invalidation is asynchronous). SQLite opens those with
    O_CREAT, which the kernel drops for a cached name: create the file,
    as the same open would on a plain disk.
    """
    path = db.path(kind)
    plain = flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
    try:
        return os.open(path, plain)
    except FileNotFoundError:
        sidecar = kind in (FileKind.JOURNAL, FileKind.WAL, FileKind.SHM)
        if not sidecar or not wants_write(flags):
            raise
    fd = os.open(path, plain | os.O_CREAT, 0o644)
    db.created(kind)
    return fd
