"""One replicated database: its real files, its state, and the entry points for its jobs.

Layout under `<data>/dbs/NAME/`: `database`, `journal`, `wal`, `shm` (the files the
application sees through the mount as NAME, NAME-journal, NAME-wal, NAME-shm) and
`ltx/` with one LTX file per transaction.

Commits are inferred from file events (DESIGN.md decision 2):

* rollback journal modes: the pages written to `database` while a journal is
  active form the transaction; the journal's invalidation (unlink, truncate to 0,
  or 28 zero bytes written at offset 0) is the commit;
* WAL mode: a valid, fully written commit frame (see `waltrack`).

The LTX file is made durable *before* the event that commits is performed (or,
for WAL, before the write that completed the commit frame returns), so a crash
at any point leaves either no LTX file and a hot journal / an unacknowledged WAL
tail, or the LTX file, which startup recovery re-applies.

The jobs live beside this module: `capture` (the commit path), `recovery`
(startup and settling), `transfer` (import and snapshots); `Database` holds the
state they share.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from litefspy.errors import DatabaseError, ReadOnlyError, SQLiteFormatError
from litefspy.fsutil import fsync_dir, sync_files
from litefspy.logs import kv
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.format import CHECKSUM_FLAG, format_filename
from litefspy.progress import ProgressBoard
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import parse_database_header
from litefspy.store import capture
from litefspy.store.files import APPLY_MARKER, list_ltx_files
from litefspy.store.types import (
    UNKNOWN_SIZE,
    ChecksumChanges,
    CommitInfo,
    CommitListener,
    CommittedState,
    FileKind,
    Forwarder,
    Position,
)
from litefspy.store.waltrack import WALTracker

log = logging.getLogger(__name__)


class Database:
    """A database directory and the state its jobs (capture, recovery, apply) share."""

    def __init__(
        self,
        name: str,
        root: Path,
        *,
        node_id: int,
        compress: bool = True,
        strict_verify: bool = False,
        on_commit: CommitListener | None = None,
        super_journal_exists: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.dir = root / name
        self.ltx_dir = self.dir / "ltx"
        self.node_id = node_id
        self.compress = compress
        self.strict_verify = strict_verify
        self.on_commit = on_commit
        # Resolves the super-journal path a journal records (as the application saw
        # it, in the mount) to whether it exists: it decides whether the journal is hot.
        self.super_journal_exists = super_journal_exists
        self.writable = True
        self.pos = Position(0, 0)
        self.checksums: PageChecksums | None = None
        # Capture state (see capture.py): a rollback journal is active, the pages
        # written under it, and the WAL frames seen so far.
        self.journal_active = False
        self.dirty: set[int] = set()
        self.wal = WALTracker(name)
        self._wal_fd: int | None = None
        self._db_fd: int | None = None
        # The committed database header says WAL mode.
        self.is_wal_db = False
        self.last_commit_ms = 0
        # Size of the newest LTX file when this node wrote it (unknown: huge).
        self.last_commit_size = UNKNOWN_SIZE
        # LTX files written but not yet fsynced (WAL commits), oldest first.
        self.unsynced: list[Path] = []
        # The undo record of the newest captured commit (a failed journal
        # invalidation puts the checksums back).
        self.last_changes: ChecksumChanges | None = None
        # Set while this replica holds a halt lock on the database: every commit
        # captured here is applied by the primary before it completes.
        self.forward: Forwarder | None = None
        # While a worker thread runs a file operation that may capture a commit
        # (write forwarding), its commit notices wait here for the trio thread.
        self._held_notices: list[CommitInfo] | None = None
        # Where long work (the startup check) shows its progress (set by the store).
        self.progress: ProgressBoard | None = None

    # ----------------------------------------------------------------- paths

    def path(self, kind: FileKind) -> Path:
        """The real file behind one of the database's names."""
        return self.dir / kind.backing_name

    @property
    def db_path(self) -> Path:
        return self.path(FileKind.DATABASE)

    @property
    def is_deleted(self) -> bool:
        """The newest transaction deleted the database (an LTX file of commit 0)."""
        return self.pos.txid > 0 and self.pos.checksum == CHECKSUM_FLAG and self.checksums is None

    def exists(self) -> bool:
        """The database file exists (it may be empty until the first commit)."""
        return self.db_path.exists()

    def ltx_path(self, min_txid: int, max_txid: int) -> Path:
        return self.ltx_dir / format_filename(min_txid, max_txid)

    def ltx_files(self) -> list[tuple[int, int, Path]]:
        """(min, max, path) of every LTX file, oldest first."""
        return list_ltx_files(self.ltx_dir)

    def ensure_dirs(self) -> None:
        """Create the database directory and its ltx/ directory."""
        if not self.ltx_dir.is_dir():
            self.ltx_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir)
            fsync_dir(self.dir.parent)

    # --------------------------------------------------------- descriptors

    def db_reader(self) -> int:
        if self._db_fd is None:
            self._db_fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._db_fd

    def wal_reader(self) -> int:
        if self._wal_fd is None:
            self._wal_fd = os.open(self.path(FileKind.WAL), os.O_RDWR | os.O_CREAT, 0o644)
        return self._wal_fd

    def close_wal_reader(self) -> None:
        """Close the WAL descriptor (the WAL was unlinked)."""
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def close(self) -> None:
        """Close the descriptors the capture logic keeps open (forgotten first:
        a descriptor number is never handed out after it was closed)."""
        fds = (self._db_fd, self._wal_fd)
        self._db_fd = self._wal_fd = None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    # ------------------------------------------------------- writes (FUSE)

    def check_writable(self, kind: FileKind, *, opening: bool = False) -> None:
        """Raise ReadOnlyError if this node must not change the file.

        On a replica, SQLite readers still need the -shm (read-write, mmapped) and
        open the -wal read-write (and delete it when the last one closes), so those
        opens are allowed; writing WAL frames is not.
        """
        if self.writable or kind is FileKind.SHM or (opening and kind is FileKind.WAL):
            return
        raise ReadOnlyError(f"database {self.name} is read-only on this node (replica)")

    def write(self, kind: FileKind, fd: int, offset: int, data: bytes) -> int:
        """Write through to the real file and run commit capture for the event."""
        return capture.write(self, kind, fd, offset, data)

    def truncate(self, kind: FileKind, size: int) -> None:
        """ftruncate/truncate of one of the database's files."""
        capture.truncate(self, kind, size)

    def unlink(self, kind: FileKind) -> None:
        """unlink of one of the database's names."""
        capture.unlink(self, kind)

    def created(self, kind: FileKind) -> None:
        """A file of this database was created through the mount."""
        if kind is FileKind.WAL:
            self.wal.reset()

    def read_db_header(self, fd: int) -> tuple[int, int]:
        """(page size, page count) of the database file as it is now."""
        raw = os.pread(fd, DB_HEADER_SIZE, 0)
        header = parse_database_header(raw)
        size = os.fstat(fd).st_size
        count = size // header.page_size
        if header.page_count_valid and header.page_count != count:
            # Routine when the file is longer: VACUUM and incremental vacuum leave
            # it so until the truncate that follows, and the valid header decides.
            # A file shorter than its header says is not.
            level = logging.WARNING if header.page_count > count else logging.DEBUG
            log.log(
                level,
                "database header size differs from file size; using header %s",
                kv(db=self.name, header_pages=header.page_count, file_pages=count),
            )
            count = header.page_count
        self.is_wal_db = header.is_wal
        return header.page_size, count

    def read_page(self, pgno: int, page_size: int) -> bytes:
        """The committed content of a page: newest WAL frame, else the database file."""
        off = self.wal.index.get(pgno)
        if off is not None:
            return os.pread(self.wal_reader(), page_size, off)
        return os.pread(self.db_reader(), page_size, (pgno - 1) * page_size)

    def announce(self, info: CommitInfo) -> None:
        """Tell the listener about a new LTX file (held while a worker thread captures)."""
        if self._held_notices is not None:
            self._held_notices.append(info)
        elif self.on_commit is not None:
            self.on_commit(info)

    def hold_notices(self) -> None:
        """Keep commit notices until `release_notices` (a worker thread captures)."""
        self._held_notices = []

    def release_notices(self) -> None:
        """Trio thread: deliver the commit notices held since `hold_notices`."""
        held, self._held_notices = self._held_notices or [], None
        if self.on_commit is not None:
            for info in held:
                self.on_commit(info)

    def sync_pending(self) -> None:
        """Make every LTX file written so far durable (file data, then the directory)."""
        if self.unsynced:
            sync_files(self.take_unsynced(), self.ltx_dir)

    def take_unsynced(self) -> list[Path]:
        """Hand the not-yet-fsynced LTX files to a caller that will sync them."""
        pending, self.unsynced = self.unsynced, []
        return pending

    # --------------------------------------------------- replication support

    def is_wal_mode(self) -> bool:
        """The committed database is in WAL mode (or a WAL is in use)."""
        return self.is_wal_db or self.wal.header is not None

    def committed_state(self) -> CommittedState:
        """The committed state, for a snapshot (call with read locks held)."""
        if self.checksums is None or not self.exists():
            raise DatabaseError(f"database {self.name} has no data to snapshot")
        return CommittedState(
            pos=self.pos,
            page_size=self.checksums.page_size,
            commit=self.checksums.page_count,
            wal_index=dict(self.wal.index),
        )

    def applied(self, pos: Position, checksums: PageChecksums | None) -> None:
        """A replica apply changed the files: adopt the new position and state."""
        self.pos = pos
        self.checksums = checksums
        self.last_commit_ms = int(time.time() * 1000)
        self.last_commit_size = UNKNOWN_SIZE
        self.close()
        if checksums is None:
            self.is_wal_db = False
            return
        try:
            fd = self.db_reader()
            self.is_wal_db = parse_database_header(os.pread(fd, DB_HEADER_SIZE, 0)).is_wal
        except (OSError, SQLiteFormatError):
            self.is_wal_db = False

    def commit_info(self, path: Path) -> CommitInfo:
        """What listeners are told about an LTX file of this database."""
        return CommitInfo(self.name, self.pos.txid, path, path.stat().st_size, self.last_commit_ms)

    @property
    def apply_marker(self) -> Path:
        """Exists while litefspy writes the newest LTX file's pages into the database."""
        return self.ltx_dir / APPLY_MARKER

    def begin_apply(self) -> None:
        """Before an LTX file is installed whose pages litefspy will write itself.

        Made durable by the directory sync that installs the file. Startup
        recovery re-applies the newest file only when this exists; otherwise a
        database that is not at a state of its history was changed by SQLite,
        and is kept (see recovery._recapture).
        """
        self.ensure_dirs()
        os.close(os.open(self.apply_marker, os.O_WRONLY | os.O_CREAT, 0o644))

    def end_apply(self) -> None:
        """The pages are written and synced (the marker's removal needs no sync)."""
        try:
            os.unlink(self.apply_marker)
        except FileNotFoundError:
            pass
