"""The store's value types: file kinds, positions, commit notices, checksum undo records."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from litefspy.errors import DatabaseError, ForwardError, ReadOnlyError
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.format import Header

# Size of an LTX file this node did not write itself (unknown: huge).
UNKNOWN_SIZE = 1 << 62


class FileKind(Enum):
    """The files of one database, as named inside the mount."""

    DATABASE = ""
    JOURNAL = "-journal"
    WAL = "-wal"
    SHM = "-shm"

    @property
    def backing_name(self) -> str:
        return {"": "database", "-journal": "journal", "-wal": "wal", "-shm": "shm"}[self.value]


@dataclass(frozen=True)
class Position:
    """Replication position: last TXID and the database checksum after it."""

    txid: int
    checksum: int

    def __str__(self) -> str:
        return f"{self.txid:016x}/{self.checksum:016x}"


# A commit's pages and LTX bytes ride along with its notice up to this size
# (larger ones, e.g. a whole database's first commit, are read from the file).
CAPTURED_BYTES_MAX = 4 << 20


@dataclass(frozen=True)
class Captured:
    """A commit as it was captured, in the memory it was captured in.

    Subscribers that can use it (the backup uploader) skip reading the file
    back. `pages` are the pages the transaction changed, in LTX order.
    """

    header: Header
    post_apply_checksum: int
    pages: tuple[tuple[int, bytes], ...]
    ltx: bytes  # the LTX file's bytes, exactly as written


@dataclass(frozen=True)
class CommitInfo:
    """What the store tells subscribers about a new LTX file."""

    name: str
    txid: int
    path: Path
    size: int
    timestamp_ms: int
    # Set for a commit captured on this node and small enough (CAPTURED_BYTES_MAX).
    captured: Captured | None = None


CommitListener = Callable[[CommitInfo], None]
# Write forwarding (the Halt service): sends a finished LTX file (path, txid,
# post-apply checksum) to the primary and returns once the primary has applied
# it; raises ForwardError if it did not.
Forwarder = Callable[[Path, int, int], None]


@dataclass(frozen=True)
class CommittedState:
    """A consistent view of the committed database, captured under SQLite read locks."""

    pos: Position
    page_size: int
    commit: int
    wal_index: dict[int, int]


class ChecksumChanges:
    """Changes to a PageChecksums made in place, with an undo record.

    Commit capture updates the node's per-page checksums directly (copying them
    would cost O(database size) per commit) and rolls back from this record if
    the LTX file cannot be written or the commit cannot complete.
    """

    def __init__(self, sums: PageChecksums) -> None:
        self.sums = sums
        self.original_count = sums.page_count
        self._old: dict[int, int] = {}

    def get(self, pgno: int) -> int:
        return self.sums.get(pgno)

    def set(self, pgno: int, checksum: int) -> None:
        if pgno not in self._old:
            self._old[pgno] = self.sums.get(pgno)
        self.sums.set(pgno, checksum)

    def truncate(self, page_count: int) -> None:
        for pgno in range(page_count + 1, self.sums.page_count + 1):
            if pgno not in self._old:
                self._old[pgno] = self.sums.get(pgno)
        self.sums.truncate(page_count)

    @property
    def total(self) -> int:
        return self.sums.total

    def rollback(self) -> None:
        """Put every changed page checksum and the page count back."""
        self.sums.truncate(self.original_count)
        for pgno, checksum in self._old.items():
            if pgno <= self.original_count and checksum:
                self.sums.set(pgno, checksum)
        self._old.clear()


def errno_for(exc: BaseException) -> int:
    """Map a store exception to the errno the FUSE layer answers with."""
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    if isinstance(exc, ForwardError):
        return errno.EIO
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, DatabaseError):
        return errno.EPERM
    return errno.EIO
