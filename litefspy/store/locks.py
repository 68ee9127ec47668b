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
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from litefspy.errors import DatabaseError
from litefspy.sqlite.header import PENDING_BYTE, RESERVED_BYTE, SHARED_FIRST, SHARED_SIZE
from litefspy.sqlite.shm import (
    SHM_CKPT,
    SHM_DMS,
    SHM_NLOCK,
    SHM_READ0,
    SHM_WRITE,
    WAL_INDEX_HEADER_SIZE,
    build_wal_index,
)

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


class Held(Protocol):
    """Locks held until release() (here, or in the lock keeper process)."""

    def release(self) -> None: ...


@dataclass
class HeldLocks:
    """Byte ranges locked on cached descriptors; release() unlocks them.

    The descriptors stay open in MountLocks' cache (opening and closing through
    the mount costs FUSE round trips on every replica apply); `mutex` keeps
    litefspy's own lock holders of one database from sharing an open file
    description, which would merge their locks.
    """

    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (fd, start, len)
    mutex: threading.Lock | None = None

    def release(self) -> None:
        """Unlock every range (never blocks), then let the next holder in."""
        while self.ranges:
            fd, start, length = self.ranges.pop()
            try:
                _ofd_lock(fd, fcntl.F_UNLCK, start, length, 0.0)
            except OSError:
                pass  # the descriptor was dropped from the cache and closed
        if self.mutex is not None:
            self.mutex.release()
            self.mutex = None

    def lock(self, fd: int, ltype: int, start: int, length: int, deadline: float) -> None:
        _ofd_lock(fd, ltype, start, length, deadline)
        if ltype != fcntl.F_UNLCK:
            self.ranges.append((fd, start, length))


def _share(held: HeldLocks, fd: int, deadline: float) -> None:
    """SHARED as SQLite takes it: through PENDING, so a waiting writer goes first."""
    _ofd_lock(fd, fcntl.F_RDLCK, PENDING_BYTE, 1, deadline)
    held.lock(fd, fcntl.F_RDLCK, SHARED_FIRST, SHARED_SIZE, deadline)
    _ofd_lock(fd, fcntl.F_UNLCK, PENDING_BYTE, 1, deadline)


def _exclude_shared(held: HeldLocks, fd: int, deadline: float) -> None:
    """PENDING (no new SHARED), then the whole SHARED range: no rollback-mode reader."""
    held.lock(fd, fcntl.F_WRLCK, PENDING_BYTE, 1, deadline)
    held.lock(fd, fcntl.F_WRLCK, SHARED_FIRST, SHARED_SIZE, deadline)


class MountLocks:
    """Takes SQLite-compatible locks on a database through the mount."""

    def __init__(self, mountpoint: Path, timeout: float = 30.0) -> None:
        self.mountpoint = mountpoint
        self.timeout = timeout
        self._fds: dict[str, int] = {}
        self._mutexes: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _open(self, name: str, create: bool = False) -> int | None:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            return os.open(self.mountpoint / name, flags, 0o644)
        except FileNotFoundError:
            return None

    def _cached(self, name: str, create: bool = False) -> int | None:
        """A descriptor of the file as it is now (reopened if it was replaced)."""
        fd = self._fds.get(name)
        if fd is not None:
            try:
                if os.fstat(fd).st_ino == os.stat(self.mountpoint / name).st_ino:
                    return fd
            except OSError:
                pass
            del self._fds[name]
            os.close(fd)
        fd = self._open(name, create)
        if fd is not None:
            self._fds[name] = fd
        return fd

    def _begin(self, name: str) -> HeldLocks:
        with self._guard:
            mutex = self._mutexes.setdefault(name, threading.Lock())
        if not mutex.acquire(timeout=self.timeout):
            raise LockTimeout(f"timed out waiting for another litefspy lock holder on {name}")
        return HeldLocks(mutex=mutex)

    def close(self) -> None:
        """Close the cached descriptors (worker thread: close re-enters FUSE)."""
        while self._fds:
            _, fd = self._fds.popitem()
            try:
                os.close(fd)
            except OSError:
                pass  # the mount is already gone (ENOTCONN): nothing left to release

    def read(self, name: str, wal: bool) -> HeldLocks:
        """Hold a SQLite read lock: the committed state cannot change underneath.

        Rollback mode: SHARED on the database (writers cannot get EXCLUSIVE).
        WAL mode: also the checkpoint lock and read mark 1 shared, so no checkpoint
        runs and the log cannot restart while its frames are being read.
        """
        deadline = time.monotonic() + self.timeout
        held = self._begin(name)
        try:
            fd = self._cached(name)
            if fd is None:
                return held
            _share(held, fd, deadline)
            if wal:
                shm = self._cached(name + "-shm")
                if shm is not None:
                    held.lock(shm, fcntl.F_RDLCK, SHM_CKPT, 1, deadline)
                    held.lock(shm, fcntl.F_RDLCK, SHM_READ0 + 1, 1, deadline)
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
        held = self._begin(name)
        try:
            if wal:
                shm = self._cached(name + "-shm", create=True)
                if shm is not None:
                    held.lock(shm, fcntl.F_WRLCK, SHM_WRITE, SHM_NLOCK, deadline)
                    return held
                # No -shm (the database went away meanwhile, or locking_mode=EXCLUSIVE,
                # which keeps the WAL index in heap memory and holds the database
                # lock instead): the database file's locks exclude its users.
            fd = self._cached(name)
            if fd is None:
                return held
            if writers:
                # RESERVED too: no write transaction may be open (import on a primary).
                held.lock(fd, fcntl.F_WRLCK, RESERVED_BYTE, 1, deadline)
            _exclude_shared(held, fd, deadline)
            return held
        except BaseException:
            held.release()
            raise

    def writers(
        self, name: str, wal: bool, timeout: float, extend: HeldLocks | None = None
    ) -> HeldLocks:
        """Pause every SQLite writer of `name` (the halt lock); readers go on.

        RESERVED on the database (rollback-mode writers). In WAL mode also the
        -shm write lock, plus what a connection holds: SHARED on the database
        and the shared dead-man-switch byte of -shm. Without those the last
        connection to close would checkpoint and delete the WAL and -shm (it
        would believe it was alone), and the next one to open would rebuild the
        WAL index, which needs the write lock: readers would fail with
        SQLITE_PROTOCOL. A short-lived SQLite connection first makes sure the
        WAL index is built. Holds this database's litefspy mutex until
        released, so other litefspy lock holders (snapshots, imports, demotion)
        wait. `extend`: add the WAL-mode ranges to a writers lock already held
        (the database switched to WAL meanwhile).
        """
        deadline = time.monotonic() + timeout
        held = extend if extend is not None else self._begin(name)
        try:
            fd = self._cached(name)
            if fd is None:
                raise DatabaseError(f"database {name} does not exist")
            held.lock(fd, fcntl.F_WRLCK, RESERVED_BYTE, 1, deadline)
            if wal:
                _share(held, fd, deadline)
                helper = sqlite3.connect(self.mountpoint / name, timeout=timeout)
                try:
                    helper.execute("SELECT count(*) FROM sqlite_master").fetchone()
                    shm = self._cached(name + "-shm", create=True)
                    if shm is not None:
                        held.lock(shm, fcntl.F_RDLCK, SHM_DMS, 1, deadline)
                        held.lock(shm, fcntl.F_WRLCK, SHM_WRITE, 1, deadline)
                finally:
                    helper.close()
            return held
        except BaseException as exc:
            if extend is None:
                held.release()
            if isinstance(exc, sqlite3.Error):
                raise DatabaseError(f"cannot read {name} to halt it: {exc}") from None
            raise

    def exclude_readers(self, name: str, wal: bool) -> HeldLocks:
        """With `writers` held: keep readers out too, until this is released.

        Takes the remaining ranges of `exclusive` on the same cached descriptors
        (one open file description, so they merge with the writers lock instead
        of conflicting with it); releasing them leaves the writers lock in place.
        """
        deadline = time.monotonic() + self.timeout
        held = HeldLocks()
        try:
            if wal:
                shm = self._cached(name + "-shm", create=True)
                if shm is not None:
                    held.lock(shm, fcntl.F_WRLCK, SHM_CKPT, SHM_NLOCK - 1, deadline)
                    return held
            fd = self._cached(name)
            if fd is not None:
                _exclude_shared(held, fd, deadline)
            return held
        except BaseException:
            held.release()
            raise

    def reset_wal_index(self, name: str, page_size: int) -> None:
        """Make WAL readers drop their page caches after a replica apply.

        A reader keeps its cached pages while the WAL-index header in -shm is
        byte-for-byte the one it saw last. Zeroing the header is not enough: the
        header a reader rebuilds from the (empty) replica WAL is the same every
        time. So litefspy writes a valid header for an empty log with a new
        change counter (iChange), and a fresh checkpoint record. Written through
        the mount, so the applications' mmaps of -shm see it at once.
        """
        fd = self._cached(name + "-shm")
        if fd is None:
            return
        old = os.pread(fd, WAL_INDEX_HEADER_SIZE, 0)
        os.pwrite(fd, build_wal_index(old, page_size), 0)
