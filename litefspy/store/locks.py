"""SQLite's own locks, taken by litefspy through its mount (DESIGN.md decision 2).

pyfuse3 registers no lock handlers, so the kernel enforces fcntl locks among the
processes using the mount and litefspy never sees them. When litefspy must keep
SQLite readers or writers out (replica apply, consistent snapshot), it opens the
file *through its own mount* and takes the same byte ranges SQLite uses as OFD
locks; the kernel makes them conflict with the applications' POSIX locks.

Opening a file through the mount re-enters the daemon, so everything here runs in
a worker thread (trio.to_thread), never on the trio loop that serves FUSE.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from litefspy.errors import DatabaseError

# Database file lock bytes (unix VFS).
PENDING_BYTE = 0x40000000
RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510
# -shm lock bytes: write, checkpoint, recover, then five read marks.
SHM_WRITE = 120
SHM_CKPT = 121
SHM_READ0 = 123
SHM_NLOCK = 8

_FLOCK = "hhqqixxxx"  # struct flock on Linux x86_64/aarch64: 32 bytes


class LockTimeout(DatabaseError):
    """SQLite connections held a conflicting lock for too long."""


def _ofd_lock(fd: int, ltype: int, start: int, length: int, deadline: float) -> None:
    data = struct.pack(_FLOCK, ltype, os.SEEK_SET, start, length, 0)
    delay = 0.0002
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, data)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise LockTimeout(f"timed out waiting for SQLite lock bytes {start}+{length}")
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


@dataclass
class HeldLocks:
    """Descriptors whose OFD locks are held; closing them releases the locks."""

    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        """Close every descriptor (must run in a worker thread: close re-enters FUSE)."""
        while self.fds:
            os.close(self.fds.pop())


class MountLocks:
    """Takes SQLite-compatible locks on a database through the mount."""

    def __init__(self, mountpoint: Path, timeout: float = 30.0) -> None:
        self.mountpoint = mountpoint
        self.timeout = timeout

    def _open(self, name: str, create: bool = False) -> int | None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            return os.open(self.mountpoint / name, flags, 0o644)
        except FileNotFoundError:
            return None

    def read(self, name: str, wal: bool) -> HeldLocks:
        """Hold a SQLite read lock: the committed state cannot change underneath.

        Rollback mode: SHARED on the database (writers cannot get EXCLUSIVE).
        WAL mode: also the checkpoint lock and read mark 1 shared, so no checkpoint
        runs and the log cannot restart while its frames are being read.
        """
        deadline = time.monotonic() + self.timeout
        held = HeldLocks()
        try:
            fd = self._open(name)
            if fd is None:
                return held
            held.fds.append(fd)
            _ofd_lock(fd, fcntl.F_RDLCK, PENDING_BYTE, 1, deadline)
            _ofd_lock(fd, fcntl.F_RDLCK, SHARED_FIRST, SHARED_SIZE, deadline)
            _ofd_lock(fd, fcntl.F_UNLCK, PENDING_BYTE, 1, deadline)
            if wal:
                shm = self._open(name + "-shm")
                if shm is not None:
                    held.fds.append(shm)
                    _ofd_lock(shm, fcntl.F_RDLCK, SHM_CKPT, 1, deadline)
                    _ofd_lock(shm, fcntl.F_RDLCK, SHM_READ0 + 1, 1, deadline)
            return held
        except BaseException:
            held.release()
            raise

    def exclusive(self, name: str, wal: bool, writers: bool = False) -> HeldLocks:
        """Keep every SQLite reader out while a replica changes the database.

        Rollback mode: PENDING (no new SHARED) then the whole SHARED range; with
        `writers`, RESERVED first so that no write transaction is open either.
        WAL mode: readers keep SHARED on the database for their connection's life,
        so exclusion is by the -shm locks: write, checkpoint, recover and all read
        marks. The -shm file is created if no reader has made it yet, so a reader
        that opens the database meanwhile still meets the locks.
        """
        deadline = time.monotonic() + self.timeout
        held = HeldLocks()
        try:
            if wal:
                shm = self._open(name + "-shm", create=True)
                assert shm is not None
                held.fds.append(shm)
                _ofd_lock(shm, fcntl.F_WRLCK, SHM_WRITE, SHM_NLOCK, deadline)
                return held
            fd = self._open(name)
            if fd is None:
                return held
            held.fds.append(fd)
            if writers:
                # RESERVED too: no write transaction may be open (import on a primary).
                _ofd_lock(fd, fcntl.F_WRLCK, RESERVED_BYTE, 1, deadline)
            _ofd_lock(fd, fcntl.F_WRLCK, PENDING_BYTE, 1, deadline)
            _ofd_lock(fd, fcntl.F_WRLCK, SHARED_FIRST, SHARED_SIZE, deadline)
            return held
        except BaseException:
            held.release()
            raise

    def reset_wal_index(self, name: str) -> None:
        """Make WAL readers rebuild their index: zero the -shm header through the mount.

        Readers cache pages between transactions while the WAL-index header is
        unchanged; a zeroed header forces recovery (from the replica's empty WAL)
        and a new header, so every reader drops its cache and sees the new pages.
        Writing through the mount keeps the applications' mmaps coherent.
        """
        fd = self._open(name + "-shm")
        if fd is None:
            return
        try:
            if os.fstat(fd).st_size >= 136:
                os.pwrite(fd, bytes(136), 0)
        finally:
            os.close(fd)
