"""One replicated database: its real files, commit capture, LTX history and recovery.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from litefspy.errors import (
    DatabaseError,
    ForwardError,
    LTXError,
    ReadOnlyError,
    RecoveryError,
    SQLiteFormatError,
)
from litefspy.logs import kv
from litefspy.ltx.apply import apply_ltx
from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.encoder import Encoder
from litefspy.ltx.files import fsync_dir
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS,
    Header,
    format_filename,
    lock_pgno,
    parse_filename,
)
from litefspy.progress import STARTUP_CHECK, Progress, ProgressBoard
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import parse_database_header
from litefspy.sqlite.journal import (
    JOURNAL_HEADER_SIZE,
    is_hot_journal,
    parse_journal_header,
    read_super_journal_name,
    rollback_journal,
)
from litefspy.sqlite.wal import WAL_HEADER_SIZE, WALReader, parse_wal_header
from litefspy.store import cleanstop
from litefspy.store.waltrack import WALCommit, WALTracker

log = logging.getLogger(__name__)

ZERO_HEADER = bytes(28)
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


@dataclass(frozen=True)
class CommitInfo:
    """What the store tells subscribers about a new LTX file."""

    name: str
    txid: int
    path: Path
    size: int
    timestamp_ms: int


CommitListener = Callable[[CommitInfo], None]
# Write forwarding (litefspy.halt): sends a finished LTX file (path, txid,
# post-apply checksum) to the primary and returns once the primary has applied
# it; raises ForwardError if it did not.
Forwarder = Callable[[Path, int, int], None]


class Database:
    """A database directory and the commit-capture state machine for it."""

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
        self._journal_active = False
        self._dirty: set[int] = set()
        self._wal = WALTracker(name)
        self._wal_fd: int | None = None
        self._db_fd: int | None = None
        self._is_wal_db = False
        self.last_commit_ms = 0
        # Size of the newest LTX file when this node wrote it (unknown: huge).
        self.last_commit_size = UNKNOWN_SIZE
        # LTX files written but not yet fsynced (WAL commits), oldest first.
        self.unsynced: list[Path] = []
        self._last_changes: ChecksumChanges | None = None
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
        out = []
        try:
            names = os.listdir(self.ltx_dir)
        except FileNotFoundError:
            return []
        for fname in names:
            if not fname.endswith(".ltx"):
                continue
            try:
                lo, hi = parse_filename(fname)
            except LTXError:
                continue
            out.append((lo, hi, self.ltx_dir / fname))
        # Newest last: by max TXID; a snapshot (min 1) covering the same TXID as an
        # incremental file sorts after it (it replaced that history).
        out.sort(key=lambda t: (t[1], -t[0]))
        return out

    def ensure_dirs(self) -> None:
        """Create the database directory and its ltx/ directory."""
        if not self.ltx_dir.is_dir():
            self.ltx_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir)
            fsync_dir(self.dir.parent)

    # --------------------------------------------------------- descriptors

    def _db_reader(self) -> int:
        if self._db_fd is None:
            self._db_fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._db_fd

    def _wal_reader(self) -> int:
        if self._wal_fd is None:
            self._wal_fd = os.open(self.path(FileKind.WAL), os.O_RDWR | os.O_CREAT, 0o644)
        return self._wal_fd

    def close(self) -> None:
        """Close the descriptors the capture logic keeps open."""
        for fd in (self._db_fd, self._wal_fd):
            if fd is not None:
                os.close(fd)
        self._db_fd = self._wal_fd = None

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
        if kind is FileKind.SHM:
            return os.pwrite(fd, data, offset)
        if not (self.writable or self._finishing_rollback(kind, offset, data)):
            self.check_writable(kind)
        if kind is FileKind.DATABASE:
            return self._write_database(fd, offset, data)
        if kind is FileKind.JOURNAL:
            return self._write_journal(fd, offset, data)
        return self._write_wal(fd, offset, data)

    def _finishing_rollback(self, kind: FileKind, offset: int, data: bytes) -> bool:
        """On a node that just lost the primary role, let SQLite finish rolling back.

        A connection that was mid-transaction when the node was demoted puts the
        original pages back into the database and then invalidates its journal;
        both are allowed while the journal is active. The invalidation itself is
        checked in `_commit_then`: it must leave the committed state unchanged.
        """
        if not self._journal_active:
            return False
        if kind is FileKind.DATABASE:
            return True
        return kind is FileKind.JOURNAL and _is_journal_invalidation(offset, data)

    def _write_database(self, fd: int, offset: int, data: bytes) -> int:
        if not (self._journal_active or self._is_wal_db or self._wal.header is not None):
            raise DatabaseError(
                f"write to {self.name} refused: no transaction is open (no rollback journal "
                "and not in WAL mode). litefspy replicates SQLite transactions only; "
                "journal_mode=MEMORY/OFF and non-SQLite writes are not supported "
                "(use `litefspy import` to load a database file)"
            )
        if offset < DB_HEADER_SIZE:
            self._check_header_write(offset, data)
        written = os.pwrite(fd, data, offset)
        if self._journal_active:
            page_size = self._page_size_hint(offset, data)
            first = offset // page_size + 1
            last = (offset + written - 1) // page_size + 1
            self._dirty.update(range(first, last + 1))
        return written

    def _check_header_write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) >= DB_HEADER_SIZE:
            try:
                parse_database_header(data[:DB_HEADER_SIZE])
            except SQLiteFormatError as exc:
                raise DatabaseError(f"write to {self.name} refused: {exc}") from exc

    def _page_size_hint(self, offset: int, data: bytes) -> int:
        if offset == 0 and len(data) >= DB_HEADER_SIZE:
            return parse_database_header(data[:DB_HEADER_SIZE]).page_size
        if self.checksums is not None:
            return self.checksums.page_size
        raw = os.pread(self._db_reader(), DB_HEADER_SIZE, 0)
        try:
            return parse_database_header(raw).page_size
        except SQLiteFormatError:
            # Smallest SQLite page: marks every page the write can touch.
            return 512

    def _write_journal(self, fd: int, offset: int, data: bytes) -> int:
        if _is_journal_invalidation(offset, data):
            # journal_mode=PERSIST invalidates the journal by zeroing its header:
            # this is the commit (or the end of a rollback).
            return self._commit_then(lambda: os.pwrite(fd, data, offset))
        written = os.pwrite(fd, data, offset)
        self._journal_active = True
        return written

    def _write_wal(self, fd: int, offset: int, data: bytes) -> int:
        reader = self._wal_reader()
        backup: tuple[bytes, int] | None = None
        if self._wal.may_complete_commit(reader, offset, data):
            backup = (os.pread(fd, len(data), offset), os.fstat(fd).st_size)
        written = os.pwrite(fd, data, offset)
        commit = self._wal.on_write(reader, offset, written)
        while commit is not None:
            try:
                self._capture_wal(commit)
            except Exception:
                self._wal.reject()
                if backup is not None:
                    # SQLite's WAL recovery trusts every valid commit frame it finds:
                    # a commit litefspy could not record must not stay in the file.
                    old, size = backup
                    os.pwrite(fd, old, offset)
                    if offset + len(data) > size:
                        os.ftruncate(fd, max(size, offset + len(old)))
                raise
            self._wal.accept(commit)
            self._prune_wal_index(commit.commit)
            if self.strict_verify:
                self._verify_full()
            commit = self._wal.next_commit(reader)
        return written

    def truncate(self, kind: FileKind, size: int) -> None:
        """ftruncate/truncate of one of the database's files."""
        path = self.path(kind)
        if kind is FileKind.SHM:
            os.truncate(path, size)
            return
        if not (kind is FileKind.JOURNAL and size == 0 and self._journal_active):
            self.check_writable(kind, opening=kind is FileKind.WAL)
        if kind is FileKind.JOURNAL:
            if size == 0:
                self._commit_then(lambda: os.truncate(path, 0))
            else:
                os.truncate(path, size)
            return
        if kind is FileKind.WAL:
            # Replicas let the last reader truncate the (frameless) WAL.
            os.truncate(path, size)
            self._wal.on_truncate(size)
            return
        if not (self._journal_active or self._is_wal_db or self._wal.header is not None):
            # VACUUM trims the file after its journal is gone: fine as long as
            # nothing of the committed database is cut off.
            committed = self.checksums
            if committed is None or size < committed.page_count * committed.page_size:
                raise DatabaseError(
                    f"truncate of {self.name} to {size} bytes refused: no transaction is "
                    "open and it would cut off committed pages"
                )
        os.truncate(path, size)

    def unlink(self, kind: FileKind) -> None:
        """unlink of one of the database's names."""
        path = self.path(kind)
        if kind is FileKind.SHM:
            path.unlink()
            return
        if not (kind is FileKind.JOURNAL and self._journal_active):
            self.check_writable(kind, opening=kind is FileKind.WAL)
        if kind is FileKind.JOURNAL:
            self._commit_then(path.unlink)
            return
        if kind is FileKind.WAL:
            path.unlink()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            self._wal.reset()
            return
        self._delete_database()

    def created(self, kind: FileKind) -> None:
        """A file of this database was created through the mount."""
        if kind is FileKind.WAL:
            self._wal.reset()

    # ------------------------------------------------------ commit capture

    def _commit_then(self, invalidate: Callable[[], object]) -> int:
        """Record the rollback-journal transaction as LTX, then invalidate the journal."""
        if not self._dirty:
            self._journal_active = False
            result = invalidate()
            return result if isinstance(result, int) else 0
        if not self.writable:
            # Demoted mid-transaction: only a rollback (no change) may complete.
            if self._dirty_pages_changed():
                raise ReadOnlyError(
                    f"commit to {self.name} refused: this node does not take writes any more "
                    "(it was demoted, or its halt lock ended)"
                )
            self._journal_active = False
            self._dirty.clear()
            result = invalidate()
            return result if isinstance(result, int) else 0
        prev_pos, prev_checksums = self.pos, self.checksums
        try:
            created = self._capture_rollback()
        except OSError:
            # No room to record it (a full disk). If SQLite has just rolled the
            # transaction back, the pages are the committed ones again: nothing
            # to record, and the journal may go. Otherwise the commit fails.
            if self._dirty_pages_changed():
                raise
            created = None
        try:
            result = invalidate()
        except OSError:
            if created is not None:
                # SQLite sees the failure and will roll the journal back: so must we.
                created.unlink(missing_ok=True)
                if (
                    prev_checksums is not None
                    and self._last_changes is not None
                    and (self._last_changes.sums is prev_checksums)
                ):
                    self._last_changes.rollback()
                self.pos, self.checksums = prev_pos, prev_checksums
            raise
        self._dirty.clear()
        self._journal_active = False
        if self.strict_verify and created is not None:
            self._verify_full()
        return result if isinstance(result, int) else 0

    def _dirty_pages_changed(self) -> bool:
        """Do the pages written under the active journal differ from the committed state?"""
        old = self.checksums
        fd = self._db_reader()
        size = os.fstat(fd).st_size
        if old is None:
            return size > 0
        page_size = old.page_size
        if size != old.page_count * page_size:
            return True
        lock = lock_pgno(page_size)
        for pgno in self._dirty:
            if pgno > old.page_count or pgno == lock:
                continue
            data = os.pread(fd, page_size, (pgno - 1) * page_size)
            if page_checksum(pgno, data) != old.get(pgno):
                return True
        return False

    def _read_db_header(self, fd: int) -> tuple[int, int]:
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
        self._is_wal_db = header.is_wal
        return header.page_size, count

    def _capture_rollback(self) -> Path | None:
        """Build the LTX file of the pages written since the journal became active."""
        fd = self._db_reader()
        if os.fstat(fd).st_size == 0:
            return None
        try:
            page_size, commit = self._read_db_header(fd)
        except SQLiteFormatError as exc:
            raise DatabaseError(f"cannot capture commit of {self.name}: {exc}") from exc
        old = self.checksums
        full = old is None or old.page_size != page_size or self.pos.txid == 0
        if full:
            candidates: Iterator[int] = iter(range(1, commit + 1))
            base = ChecksumChanges(PageChecksums(page_size))
        else:
            assert old is not None
            extra = range(old.page_count + 1, commit + 1)
            candidates = iter(sorted(p for p in self._dirty.union(extra) if p <= commit))
            base = ChecksumChanges(old)

        def pages() -> Iterator[tuple[int, bytes]]:
            lock = lock_pgno(page_size)
            for pgno in candidates:
                if pgno == lock:
                    continue
                data = os.pread(fd, page_size, (pgno - 1) * page_size)
                if len(data) != page_size:
                    raise DatabaseError(
                        f"cannot capture commit of {self.name}: page {pgno} is short"
                    )
                ck = page_checksum(pgno, data)
                if not full and base.get(pgno) == ck:
                    continue
                base.set(pgno, ck)
                yield pgno, data

        base.truncate(commit)
        try:
            path = self._write_ltx(page_size, commit, pages(), base, full=full)
        except BaseException:
            base.rollback()
            raise
        if path is not None:
            self._last_changes = base
        return path

    def _capture_wal(self, commit: WALCommit) -> None:
        wal_fd = self._wal_reader()
        header = self._wal.header
        assert header is not None
        page_size = header.page_size
        old = self.checksums
        full = old is None or old.page_size != page_size or self.pos.txid == 0
        base = ChecksumChanges(PageChecksums(page_size) if full or old is None else old)

        def page_at(pgno: int) -> bytes:
            off = commit.pages.get(pgno)
            if off is not None:
                return os.pread(wal_fd, page_size, off)
            return self.read_page(pgno, page_size)

        if full:
            numbers: list[int] = list(range(1, commit.commit + 1))
        else:
            numbers = sorted(p for p in commit.pages if p <= commit.commit)

        def pages() -> Iterator[tuple[int, bytes]]:
            lock = lock_pgno(page_size)
            for pgno in numbers:
                if pgno == lock:
                    continue
                data = page_at(pgno)
                if len(data) != page_size:
                    data = data.ljust(page_size, b"\0")
                ck = page_checksum(pgno, data)
                if not full and base.get(pgno) == ck:
                    continue
                base.set(pgno, ck)
                yield pgno, data

        base.truncate(commit.commit)
        try:
            self._write_ltx(
                page_size,
                commit.commit,
                pages(),
                base,
                full=full,
                wal=(commit.start, commit.end - commit.start, commit.salt1, commit.salt2),
                durable=False,
            )
        except BaseException:
            base.rollback()
            raise
        if 1 in commit.pages:
            first = os.pread(wal_fd, DB_HEADER_SIZE, commit.pages[1])
            try:
                self._is_wal_db = parse_database_header(first).is_wal
            except SQLiteFormatError:
                pass

    def _prune_wal_index(self, commit: int) -> None:
        for pgno in [p for p in self._wal.index if p > commit]:
            del self._wal.index[pgno]

    def read_page(self, pgno: int, page_size: int) -> bytes:
        """The committed content of a page: newest WAL frame, else the database file."""
        off = self._wal.index.get(pgno)
        if off is not None:
            return os.pread(self._wal_reader(), page_size, off)
        return os.pread(self._db_reader(), page_size, (pgno - 1) * page_size)

    def _write_ltx(
        self,
        page_size: int,
        commit: int,
        pages: Iterator[tuple[int, bytes]],
        changes: ChecksumChanges | PageChecksums,
        *,
        full: bool,
        wal: tuple[int, int, int, int] = (0, 0, 0, 0),
        notify: bool = True,
        durable: bool = True,
    ) -> Path | None:
        """Encode the pages as the next LTX file; None if nothing changed.

        `notify=False` when called from a worker thread: the caller notifies
        listeners from the trio thread. `durable=False` (WAL commits) leaves the
        fsync to `sync_pending`, which runs before SQLite's own fsync of the WAL
        returns (or within a second for synchronous=NORMAL): the LTX history is
        then exactly as durable as the application asked its database to be.
        """
        self.ensure_dirs()
        txid = self.pos.txid + 1
        snapshot = txid == 1
        now_ms = int(time.time() * 1000)
        header = Header(
            flags=FLAG_COMPRESS if self.compress else 0,
            page_size=page_size,
            commit=commit,
            min_txid=txid,
            max_txid=txid,
            timestamp=now_ms,
            pre_apply_checksum=0 if snapshot else self.pos.checksum,
            wal_offset=wal[0],
            wal_size=wal[1],
            wal_salt1=wal[2],
            wal_salt2=wal[3],
            node_id=self.node_id,
        )
        if isinstance(changes, PageChecksums):
            changes = ChecksumChanges(changes)
        checksums = changes.sums
        final = self.ltx_path(txid, txid)
        tmp = final.with_name(final.name + ".tmp")
        wrote = 0
        with open(tmp, "wb") as f:
            enc = Encoder(f, header)
            for pgno, data in pages:
                enc.write_page(pgno, data)
                wrote += 1
            if wrote == 0 and not full and commit == changes.original_count:
                f.close()
                tmp.unlink()
                return None
            enc.finish(checksums.total)
            f.flush()
            size = f.tell()
            if self.forward is not None:
                # Primary first: until it has the transaction, the commit has not
                # happened (a failure undoes it here like a full disk would).
                try:
                    self.forward(tmp, txid, checksums.total)
                except BaseException:
                    f.close()
                    tmp.unlink(missing_ok=True)
                    raise
            if durable:
                # Content durable before the name exists: a final-named file is then
                # never torn. The rename itself becomes durable with the next sync;
                # if a crash loses it, recovery promotes the valid .tmp file.
                # fdatasync of this one file, not syncfs: the journalling
                # filesystems litefspy runs on (ext4, xfs, btrfs) commit a new
                # file's directory entry with it, and a commit no longer waits for
                # every other dirty file of the filesystem (p50 -30 %, p90 several
                # times lower on a busy machine).
                os.fdatasync(f.fileno())
        os.rename(tmp, final)
        if not durable:
            self.unsynced.append(final)
        self.checksums = checksums
        self.pos = Position(txid, checksums.total)
        self.last_commit_ms = now_ms
        self.last_commit_size = size
        if log.isEnabledFor(logging.DEBUG):
            log.debug("commit %s", kv(db=self.name, txid=f"{txid:016x}", pages=wrote))
        if notify and self.on_commit is not None:
            info = CommitInfo(self.name, txid, final, size, now_ms)
            if self._held_notices is not None:
                self._held_notices.append(info)
            else:
                self.on_commit(info)
        return final

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

    def _verify_full(self) -> None:
        """strict-verify: recompute the whole checksum from the committed pages."""
        assert self.checksums is not None
        page_size = self.checksums.page_size
        full = PageChecksums(page_size)
        lock = lock_pgno(page_size)
        for pgno in range(1, self.checksums.page_count + 1):
            if pgno != lock:
                full.set(pgno, page_checksum(pgno, self.read_page(pgno, page_size)))
        full.truncate(self.checksums.page_count)
        if full.total != self.checksums.total:
            raise DatabaseError(
                f"strict-verify failed for {self.name} at txid {self.pos.txid:016x}: "
                f"incremental checksum {self.checksums.total:016x} != full {full.total:016x}"
            )

    def _delete_database(self) -> None:
        """The application deleted the database: record it (commit 0), remove the files."""
        if self.pos.txid > 0 and self.checksums is not None:
            empty = PageChecksums(self.checksums.page_size)
            self._write_ltx(self.checksums.page_size, 0, iter(()), empty, full=True)
        self.close()
        for kind in (FileKind.DATABASE, FileKind.JOURNAL, FileKind.WAL, FileKind.SHM):
            self.path(kind).unlink(missing_ok=True)
        self.checksums = None
        self._dirty.clear()
        self._journal_active = False
        self._wal.reset()
        self._is_wal_db = False

    # --------------------------------------------------- replication support

    def is_wal_mode(self) -> bool:
        """The committed database is in WAL mode (or a WAL is in use)."""
        return self._is_wal_db or self._wal.header is not None

    def committed_state(self) -> CommittedState:
        """The committed state, for a snapshot (call with read locks held)."""
        if self.checksums is None or not self.exists():
            raise DatabaseError(f"database {self.name} has no data to snapshot")
        return CommittedState(
            pos=self.pos,
            page_size=self.checksums.page_size,
            commit=self.checksums.page_count,
            wal_index=dict(self._wal.index),
        )

    def applied(self, pos: Position, checksums: PageChecksums | None) -> None:
        """A replica apply changed the files: adopt the new position and state."""
        self.pos = pos
        self.checksums = checksums
        self.last_commit_ms = int(time.time() * 1000)
        self.last_commit_size = UNKNOWN_SIZE
        self.close()
        if checksums is None:
            self._is_wal_db = False
            return
        try:
            fd = self._db_reader()
            self._is_wal_db = parse_database_header(os.pread(fd, DB_HEADER_SIZE, 0)).is_wal
        except (OSError, SQLiteFormatError):
            self._is_wal_db = False

    def import_file(
        self, src: Path, page_size: int, commit: int, progress: Progress | None = None
    ) -> Path:
        """Replace the database with `src` as one new TXID (worker thread, locks held).

        The LTX file is written first, then the database file, so recovery after a
        crash in between re-applies the import. `progress` follows each of the
        three passes over the file.
        """
        size = page_size * commit
        if progress is not None:
            progress.next_phase("checksumming", size)
        with open(src, "rb") as f:
            checksums = PageChecksums.from_file(
                f, page_size, commit, on_progress=progress.advance if progress else None
            )
        src_fd = os.open(src, os.O_RDONLY)
        self.begin_apply()
        try:
            if progress is not None:
                progress.next_phase("writing the LTX file", size)
            ltx = self._write_ltx(
                page_size,
                commit,
                _counted(self._all_pages(src_fd, page_size, commit), page_size, progress),
                checksums,
                full=True,
                notify=False,
            )
            assert ltx is not None
            self.close()
            if progress is not None:
                progress.next_phase("writing the database", size)
            fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                pages = _counted(self._all_pages(src_fd, page_size, commit), page_size, progress)
                for pgno, data in pages:
                    os.pwrite(fd, data, (pgno - 1) * page_size)
                os.ftruncate(fd, commit * page_size)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.end_apply()
        finally:
            os.close(src_fd)
        # Frames of the old database must never be read again.
        wal = self.path(FileKind.WAL)
        if wal.exists():
            os.truncate(wal, 0)
        self._wal.reset()
        self._dirty.clear()
        self._journal_active = False
        self._is_wal_db = parse_database_header(
            os.pread(self._db_reader(), DB_HEADER_SIZE, 0)
        ).is_wal
        return ltx

    def needs_settling(self) -> bool:
        """Is there anything besides the database file that readers would see?

        A replica's WAL is empty and it has no journal, except after writes a
        halt lock allowed (write forwarding) or a demotion.
        """
        return (
            bool(self._wal.index)
            or self._wal.header is not None
            or (self.path(FileKind.JOURNAL).exists())
        )

    def settle(self, *, verify: bool = True) -> str | None:
        """Worker thread, every SQLite connection locked out: leave only committed state.

        Rolls back a hot journal nobody finished, checkpoints the captured WAL
        frames into the database and empties the WAL (a replica applies LTX files
        to the database file, so old frames must never overlay them). With
        `verify`, the database file is then checked against the position
        (O(size): demotion only). Returns what was done, for the log, or None.
        """
        done = []
        journal = self.path(FileKind.JOURNAL)
        if journal.exists():
            if is_hot_journal(journal, self.db_path, self.super_journal_exists):
                pages = rollback_journal(journal, self.db_path)
                done.append(f"rolled back a hot journal ({pages} pages)")
            # Nobody holds a lock: what is left is SQLite's own garbage (a
            # transaction that died before its journal was synced), which a
            # reader would try to delete, and readers may not delete on a replica.
            journal.unlink()
        self._journal_active = False
        self._dirty.clear()
        wal = self.path(FileKind.WAL)
        if self._wal.index and self.checksums is not None:
            wal_fd = os.open(wal, os.O_RDONLY)
            try:
                fold_wal_pages(
                    self.db_path,
                    wal_fd,
                    self._wal.index,
                    self.checksums.page_size,
                    self.checksums.page_count,
                )
            finally:
                os.close(wal_fd)
            done.append(f"checkpointed {len(self._wal.index)} WAL pages")
        if wal.exists() and wal.stat().st_size > 0:
            os.truncate(wal, 0)
        self._wal.reset()
        self.close()
        if verify and self.checksums is not None and self.exists():
            with open(self.db_path, "rb") as f:
                actual = PageChecksums.from_file(
                    f, self.checksums.page_size, self.checksums.page_count
                )
            if actual.total != self.pos.checksum:
                raise RecoveryError(
                    f"database {self.name} does not match its position {self.pos} after "
                    "demotion; it will be re-snapshotted from the new primary"
                )
        return "; ".join(done) or None

    def commit_info(self, path: Path) -> CommitInfo:
        """What listeners are told about an LTX file of this database."""
        return CommitInfo(self.name, self.pos.txid, path, path.stat().st_size, self.last_commit_ms)

    # -------------------------------------------------------------- recovery

    def recover(self) -> None:
        """Bring the directory to a consistent state at startup (DESIGN.md decision 6)."""
        self.ensure_dirs()
        self._promote_synced_tmp_files()
        saved = cleanstop.take(self.dir)
        files, dropped = self._drop_torn_tail(self.ltx_files(), saved)
        newest = files[-1][2] if files else None
        header = trailer = None
        if newest is not None:
            try:
                if saved is not None and saved.ltx_unchanged(newest):
                    # Verified when written and fsynced before the clean stop.
                    header, trailer = cleanstop.read_ends(newest)
                else:
                    header, trailer = verify_file(newest)
            except LTXError as exc:
                raise RecoveryError(
                    f"database {self.name}: newest LTX file {newest} is invalid ({exc}); "
                    "it holds the last committed transaction, so litefspy will not guess. "
                    "Restore it from a replica's ltx/ directory, or move "
                    f"{self.dir} aside and re-import the database"
                ) from exc
        clean = self._take_clean_record()
        journal = self.path(FileKind.JOURNAL)
        rolled_back = False
        if journal.exists():
            if is_hot_journal(journal, self.db_path, self.super_journal_exists):
                restored = rollback_journal(journal, self.db_path)
                rolled_back = True
                log.info(
                    "rolled back hot journal: its transaction was never committed %s",
                    kv(db=self.name, pages=restored),
                )
            elif self._names_super_journal(journal):
                # A multi-database commit completed (its super-journal is gone) before
                # this journal was invalidated: SQLite keeps the transaction, so the
                # database is ahead of its history and is recaptured below.
                rolled_back = True
                log.info(
                    "journal of a committed multi-database transaction finalized %s",
                    kv(db=self.name),
                )
            journal.unlink()
        wal_beyond = self._recover_wal(header)
        self.path(FileKind.SHM).unlink(missing_ok=True)
        if header is None or trailer is None:
            self._adopt_existing_file()
            return
        self.pos = Position(header.max_txid, trailer.post_apply_checksum)
        if header.commit == 0:
            if self.db_path.exists() and self.db_path.stat().st_size > 0:
                raise RecoveryError(
                    f"database {self.name}: newest LTX {newest} deletes the database but "
                    f"{self.db_path} still has data; move it aside to continue"
                )
            self.db_path.unlink(missing_ok=True)
            self.checksums = None
            return
        assert newest is not None
        expected = trailer.post_apply_checksum
        quiet = not (rolled_back or dropped or wal_beyond or self.apply_marker.exists())
        if (quiet and self._trust_clean_stop(saved, header, expected)) or self._roll_forward(
            files, header.page_size, expected
        ):
            outcome = "history"
        elif self.apply_marker.exists():
            # litefspy itself was writing this file's pages (replica apply, import,
            # forwarded commit) when it stopped: the file is the truth.
            self._reapply_newest(newest, header.page_size, expected)
            outcome = "history"
        elif rolled_back or dropped or wal_beyond or self._is_clean_state(clean, header):
            # SQLite moved the file on, and its files are the authority for what
            # it committed: a rolled-back transaction reused free-list pages, or
            # the LTX files of the last commits were cut short or lost.
            self._recapture(newest, header.page_size, dropped)
            outcome = "recaptured"
        else:
            # No sign that SQLite changed it: damage (the newest file rewrites
            # the pages it covers; anything else is refused, untouched).
            self._reapply_newest(newest, header.page_size, expected)
            outcome = "history"
        self.end_apply()
        if dropped and outcome == "history":
            log.warning(
                "transactions lost: their LTX files were cut short by a crash and the "
                "database files do not have them either (never durable) %s",
                kv(db=self.name, txids=_txid_ranges(dropped), pos=self.pos),
            )
        try:
            self._read_db_header(self._db_reader())
        except SQLiteFormatError:
            pass

    @staticmethod
    def _names_super_journal(journal: Path) -> bool:
        with open(journal, "rb") as f:
            if parse_journal_header(f.read(JOURNAL_HEADER_SIZE)) is None:
                return False
            return read_super_journal_name(f) is not None

    def write_clean_record(self) -> None:
        """At a clean stop: the position the files are at (startup compares it), and
        the page checksums when the database file is exactly at that position
        (the next start then skips re-reading it: see store/cleanstop.py)."""
        if self.pos.txid == 0:
            return
        tmp = self.dir / (CLEAN_RECORD + ".tmp")
        tmp.write_text(f"{self.pos.txid:016x}/{self.pos.checksum:016x}\n")
        os.rename(tmp, self.dir / CLEAN_RECORD)
        checksums = self.checksums
        if checksums is None or checksums.total != self.pos.checksum or not self._file_is_state():
            return
        files = self.ltx_files()
        if files and files[-1][1] == self.pos.txid:
            cleanstop.save(self.dir, self.pos.txid, checksums, self.db_path, files[-1][2])

    def _file_is_state(self) -> bool:
        """The database file alone holds the committed state: no transaction under
        way, no journal, no WAL frames (WAL commits live in the WAL until a
        checkpoint), no litefspy apply in progress."""
        if self._journal_active or self._dirty or self.apply_marker.exists():
            return False
        if self.path(FileKind.JOURNAL).exists():
            return False
        wal = cleanstop.FileStamp.of(self.path(FileKind.WAL))
        return wal is None or wal.size <= WAL_HEADER_SIZE

    def _trust_clean_stop(
        self, saved: cleanstop.CleanSums | None, newest: Header, expected: int
    ) -> bool:
        """Adopt the page checksums saved at the clean stop if the files are untouched."""
        if saved is None or saved.txid != newest.max_txid or saved.checksum != expected:
            return False
        sums = saved.checksums
        stamp = cleanstop.FileStamp.of(self.db_path)
        if (
            stamp != saved.database
            or sums.page_size != newest.page_size
            or sums.page_count != newest.commit
            or stamp.size != sums.page_count * sums.page_size
        ):
            log.info(
                "database changed since the clean stop; checking it in full %s", kv(db=self.name)
            )
            return False
        self.checksums = sums
        log.debug("startup check skipped: untouched since a clean stop %s", kv(db=self.name))
        return True

    def _take_clean_record(self) -> Position | None:
        """The position written at the last clean stop (consumed: a crash leaves none)."""
        path = self.dir / CLEAN_RECORD
        try:
            txid, checksum = path.read_text().strip().split("/")
            pos = Position(int(txid, 16), int(checksum, 16))
        except (OSError, ValueError):
            pos = None
        path.unlink(missing_ok=True)
        return pos

    def _is_clean_state(self, clean: Position | None, newest: Header) -> bool:
        """The node stopped cleanly at a later TXID than the history now ends at, and
        the database is exactly at that state: the LTX files after it were lost."""
        if clean is None or clean.txid <= newest.max_txid:
            return False
        fd = self._db_reader()
        size = os.fstat(fd).st_size
        if size % newest.page_size:
            return False
        return self._checksums_of(fd, newest.page_size, size // newest.page_size).total == (
            clean.checksum
        )

    @property
    def apply_marker(self) -> Path:
        """Exists while litefspy writes the newest LTX file's pages into the database."""
        return self.ltx_dir / APPLY_MARKER

    def begin_apply(self) -> None:
        """Before an LTX file is installed whose pages litefspy will write itself.

        Made durable by the directory sync that installs the file. Startup
        recovery re-applies the newest file only when this exists; otherwise a
        database that is not at a state of its history was changed by SQLite,
        and is kept (see _recapture).
        """
        self.ensure_dirs()
        os.close(os.open(self.apply_marker, os.O_WRONLY | os.O_CREAT, 0o644))

    def end_apply(self) -> None:
        """The pages are written and synced (the marker's removal needs no sync)."""
        try:
            os.unlink(self.apply_marker)
        except FileNotFoundError:
            pass

    def _recapture(
        self, newest: Path, history_page_size: int, dropped: list[tuple[int, int]]
    ) -> None:
        """The database file is not at any state of its LTX history: record it as it is.

        After a crash SQLite's files say what was committed: a hot journal has been
        rolled back and the WAL folded in. The file can differ from the history
        without anything being wrong: SQLite does not journal free-list pages it
        reuses, so a rolled-back transaction leaves new bytes in them; or the LTX
        file of the last commit was lost or cut short after the commit reached
        the database. Rolling the file back to the history would undo a commit,
        so if SQLite finds the file sound its whole state becomes the next TXID
        (every page: which ones differ is unknown), which replicas apply like any
        transaction. A file SQLite finds corrupt is left untouched, offline.
        """
        fd = self._db_reader()
        try:
            page_size, commit = self._read_db_header(fd)
        except SQLiteFormatError as exc:
            raise RecoveryError(
                f"database {self.name}: {self.db_path} differs from its LTX history and is "
                f"not a valid SQLite database ({exc}); it stays offline, untouched. Restore it "
                f"from a replica (`litefspy export` there, then `litefspy import`)"
            ) from None
        problem = _quick_check(self.db_path)
        if problem is not None:
            raise RecoveryError(
                f"database {self.name}: {self.db_path} differs from its LTX history (newest "
                f"{newest.name}) and SQLite's quick_check fails ({problem}); it stays offline, "
                f"untouched. Restore it from a replica, or move {self.dir} aside"
            )
        last = self.pos
        if page_size != history_page_size:
            raise RecoveryError(
                f"database {self.name}: {self.db_path} has page size {page_size}, its LTX "
                f"history another; it stays offline. Re-import it with `litefspy import`"
            )
        self._record_whole_file(fd, page_size, commit, notify=False)
        why = (
            f"the LTX files of TXIDs {_txid_ranges(dropped)} were cut short by a crash"
            if dropped
            else "free-list pages reused by a rolled-back transaction, or a lost LTX file"
        )
        log.warning(
            "database file differs from its LTX history (%s); SQLite's quick_check passes, so "
            "its state is recorded as the next transaction; nothing was lost %s",
            why,
            kv(db=self.name, after=f"{last.txid:016x}", pos=self.pos),
        )

    def _roll_forward(
        self, files: list[tuple[int, int, Path]], page_size: int, expected: int
    ) -> bool:
        """Bring the database forward along its LTX history; True if it now matches.

        WAL commits are recorded before their LTX file is fsynced (see _write_ltx),
        so after a power loss the database (with its surviving WAL frames) can be
        at the state of an older LTX file than the newest. Find that file by its
        post-apply checksum and re-apply the ones after it, in order, each checked
        against its pre-apply checksum.
        """
        fd = self._db_reader()
        size = os.fstat(fd).st_size
        if size % page_size:
            return False
        checksums = self._checksums_with_progress(fd, page_size, size // page_size)
        if checksums.total == expected:
            self.checksums = checksums
            return True
        start = None
        for i in range(len(files) - 2, -1, -1):
            if post_apply_checksum(files[i][2]) == checksums.total:
                start = i + 1
                break
        if start is None:
            return False
        with os.fdopen(os.dup(fd), "r+b") as db:
            for _, _, path in files[start:]:
                with open(path, "rb") as f:
                    apply_ltx(db, f, checksums)
            db.flush()
            os.fsync(db.fileno())
        self.checksums = checksums
        if checksums.total != expected:
            return False
        # Nothing was lost: the LTX files had every write the file missed.
        log.info(
            "database file was behind its LTX history (its last writes had not reached "
            "the disk); rolled forward from the LTX files %s",
            kv(db=self.name, files=len(files) - start, pos=self.pos),
        )
        return True

    def _promote_synced_tmp_files(self) -> None:
        """A valid .tmp LTX file was synced before its rename: keep it, else drop it."""
        for tmp in sorted(self.ltx_dir.glob("*.ltx.tmp")):
            final = tmp.with_name(tmp.name[: -len(".tmp")])
            try:
                verify_file(tmp)
                parse_filename(final.name)
            except LTXError:
                tmp.unlink()
                continue
            if final.exists():
                tmp.unlink()
            else:
                os.rename(tmp, final)
                log.info(
                    "recovered LTX file whose rename was lost %s", kv(db=self.name, file=final.name)
                )
        fsync_dir(self.ltx_dir)

    def _drop_torn_tail(
        self, files: list[tuple[int, int, Path]], saved: cleanstop.CleanSums | None = None
    ) -> tuple[list[tuple[int, int, Path]], list[tuple[int, int]]]:
        """Remove newest LTX files that a crash cut short; return the rest and what went.

        A WAL commit's LTX file is fsynced only when the application syncs its
        WAL (see _write_ltx), so after a power loss the newest ones may be
        truncated. Whether their transactions survive is for the database files
        to say (recover() keeps them if SQLite has them). A full-length file that
        fails its checksum is corruption, not a crash: recovery refuses it.
        """
        dropped: list[tuple[int, int]] = []
        while files:
            lo, hi, path = files[-1]
            if saved is not None and saved.ltx_unchanged(path):
                break  # complete at the clean stop, untouched since
            try:
                verify_file(path)
                break
            except LTXError as exc:
                if "truncated:" not in str(exc):
                    break
                log.warning(
                    "removing an LTX file cut short by a crash; the database files decide "
                    "whether its transaction survived %s",
                    kv(db=self.name, file=path.name),
                )
                path.unlink()
                dropped.insert(0, (lo, hi))
                files = files[:-1]
        return files, dropped

    def _recover_wal(self, header: Header | None) -> bool:
        """Checkpoint the WAL's committed frames into the database; set the rest aside.

        True if it held committed transactions the LTX history does not have.
        """
        wal_path = self.path(FileKind.WAL)
        beyond = False
        if not wal_path.exists():
            return beyond
        if wal_path.stat().st_size >= WAL_HEADER_SIZE:
            with open(wal_path, "rb") as f:
                try:
                    wal_header = parse_wal_header(f.read(WAL_HEADER_SIZE))
                except SQLiteFormatError:
                    wal_header = None
            captured_end = 0
            if (
                wal_header is not None
                and header is not None
                and header.wal_size > 0
                and (header.wal_salt1, header.wal_salt2) == (wal_header.salt1, wal_header.salt2)
            ):
                captured_end = header.wal_offset + header.wal_size
            if captured_end:
                # Every committed transaction in this WAL, captured or not: SQLite
                # would read them all, so they are committed (an LTX file lost or
                # cut short leaves the database ahead of its history: recover()
                # records it).
                beyond = self._checkpoint_wal(wal_path, wal_path.stat().st_size) > captured_end
            elif wal_header is not None and wal_path.stat().st_size > WAL_HEADER_SIZE:
                aside = self.dir / f"wal.aside-{int(time.time())}"
                os.rename(wal_path, aside)
                log.warning(
                    "WAL frames not captured by any LTX file set aside %s",
                    kv(db=self.name, path=aside),
                )
        wal_path.unlink(missing_ok=True)
        return beyond

    def _checkpoint_wal(self, wal_path: Path, end: int) -> int:
        """Fold the WAL's committed transactions up to `end` in; return where the last ended."""
        folded = 0
        with open(wal_path, "rb") as wf:
            reader = WALReader(wf)
            page_size = reader.header.page_size
            latest: dict[int, int] = {}
            commit = None
            for txn in reader.transactions():
                if txn.end_offset > end:
                    break
                latest.update(txn.pages)
                commit = txn.commit
                folded = txn.end_offset
            if commit is None:
                return 0
            fold_wal_pages(self.db_path, wf.fileno(), latest, page_size, commit)
        log.info("checkpointed WAL frames %s", kv(db=self.name, pages=len(latest)))
        return folded

    def _adopt_existing_file(self) -> None:
        """A database file with no LTX history (placed in data.dir by hand): snapshot it."""
        if not self.db_path.exists() or self.db_path.stat().st_size == 0:
            self.db_path.unlink(missing_ok=True)
            self.checksums = None
            return
        fd = self._db_reader()
        try:
            page_size, commit = self._read_db_header(fd)
        except SQLiteFormatError as exc:
            raise RecoveryError(
                f"database {self.name}: {self.db_path} is not a SQLite database ({exc})"
            ) from exc
        log.info("adopting existing database file as TXID 1 %s", kv(db=self.name))
        self._record_whole_file(fd, page_size, commit)

    def _record_whole_file(
        self, fd: int, page_size: int, commit: int, *, notify: bool = True
    ) -> None:
        """Every page of the database file as the next LTX file (its whole state)."""
        self._write_ltx(
            page_size,
            commit,
            self._all_pages(fd, page_size, commit),
            self._checksums_of(fd, page_size, commit),
            full=True,
            notify=notify,
        )

    @staticmethod
    def _all_pages(fd: int, page_size: int, commit: int) -> Iterator[tuple[int, bytes]]:
        lock = lock_pgno(page_size)
        for pgno in range(1, commit + 1):
            if pgno != lock:
                yield pgno, os.pread(fd, page_size, (pgno - 1) * page_size).ljust(page_size, b"\0")

    def _checksums_with_progress(self, fd: int, page_size: int, commit: int) -> PageChecksums:
        """The startup check's full read, shown as progress (logs and status)."""
        board = self.progress
        if board is None:
            return self._checksums_of(fd, page_size, commit)
        with (
            board.track(STARTUP_CHECK, self.name, commit * page_size) as progress,
            os.fdopen(os.dup(fd), "rb") as f,
        ):
            return PageChecksums.from_file(f, page_size, commit, on_progress=progress.advance)

    @staticmethod
    def _checksums_of(fd: int, page_size: int, commit: int) -> PageChecksums:
        with os.fdopen(os.dup(fd), "rb") as f:
            return PageChecksums.from_file(f, page_size, commit)

    def _reapply_newest(self, newest: Path, page_size: int, expected: int) -> None:
        """Make the database equal to the newest LTX's post-apply state, or refuse."""
        fd = self._db_reader()
        with open(newest, "rb") as f:
            dec = Decoder(f)
            for pgno, data in dec.pages():
                os.pwrite(fd, data, (pgno - 1) * page_size)
            commit = dec.header.commit
        os.ftruncate(fd, commit * page_size)
        os.fsync(fd)
        checksums = self._checksums_of(fd, page_size, commit)
        if checksums.total != expected:
            raise RecoveryError(
                f"database {self.name}: checksum {checksums.total:016x} after re-applying "
                f"{newest.name} does not match its post-apply checksum {expected:016x}: "
                f"pages not covered by that file differ from the history. The database "
                f"stays offline; restore it from a replica (`litefspy export` there, then "
                f"`litefspy import`), or move {self.dir} aside"
            )
        self.checksums = checksums


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


APPLY_MARKER = ".applying"
CLEAN_RECORD = "clean"


def _counted(
    pages: Iterator[tuple[int, bytes]], page_size: int, progress: Progress | None
) -> Iterator[tuple[int, bytes]]:
    """`pages`, advancing `progress` by each page."""
    if progress is None:
        yield from pages
        return
    advance = progress.advance
    for page in pages:
        yield page
        advance(page_size)


def _txid_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{lo:x}" if lo == hi else f"{lo:x}-{hi:x}" for lo, hi in ranges)


def _quick_check(path: Path) -> str | None:
    """SQLite's quick_check of a database file no one else has open; None when it passes."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        conn.close()
    result = "; ".join(str(r[0]) for r in rows[:3])
    return None if result == "ok" else result


def syncfs(fd: int) -> None:
    """syncfs(2): flush every dirty file and directory entry of fd's filesystem.

    One call makes a batch of new LTX files (data and names) durable with a
    single journal commit, where fsync per file and per directory would cost one
    commit each.
    """
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fold_wal_pages(
    db_path: Path, wal_fd: int, pages: dict[int, int], page_size: int, commit: int
) -> None:
    """Checkpoint by hand: copy committed WAL pages (pgno -> page data offset) into
    the database file, cut it to `commit` pages and fsync it."""
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for pgno in sorted(pages):
            if pgno <= commit:
                os.pwrite(fd, os.pread(wal_fd, page_size, pages[pgno]), (pgno - 1) * page_size)
        os.ftruncate(fd, commit * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_files(paths: list[Path], directory: Path) -> None:
    """Make the files (and their names in `directory`) durable."""
    if not paths:
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


def post_apply_checksum(path: Path) -> int:
    """The post-apply checksum in an LTX file's trailer (its last 16 bytes)."""
    with open(path, "rb") as f:
        f.seek(-16, os.SEEK_END)
        return int.from_bytes(f.read(8), "big")


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


def _is_journal_invalidation(offset: int, data: bytes) -> bool:
    """journal_mode=PERSIST invalidates the journal by zeroing its first 28 bytes."""
    return offset == 0 and len(data) >= len(ZERO_HEADER) and data[: len(ZERO_HEADER)] == ZERO_HEADER


@dataclass(frozen=True)
class CommittedState:
    """A consistent view of the committed database, captured under SQLite read locks."""

    pos: Position
    page_size: int
    commit: int
    wal_index: dict[int, int]


def _read_pages(
    db_path: Path, wal_path: Path, state: CommittedState
) -> Iterator[tuple[int, bytes]]:
    page_size = state.page_size
    lock = lock_pgno(page_size)
    db_fd = os.open(db_path, os.O_RDONLY)
    wal_fd = os.open(wal_path, os.O_RDONLY) if state.wal_index else -1
    try:
        for pgno in range(1, state.commit + 1):
            if pgno == lock:
                continue
            off = state.wal_index.get(pgno)
            if off is not None:
                data = os.pread(wal_fd, page_size, off)
            else:
                data = os.pread(db_fd, page_size, (pgno - 1) * page_size)
            if len(data) != page_size:
                data = data.ljust(page_size, b"\0")
            yield pgno, data
    finally:
        os.close(db_fd)
        if wal_fd >= 0:
            os.close(wal_fd)


def write_snapshot(
    db: Database, state: CommittedState, out: Path, progress: Progress | None = None
) -> Path:
    """Encode the captured committed state as an LTX snapshot and verify its checksum.

    Runs in a worker thread while the caller holds SQLite read locks; `progress`
    advances by each page read.
    """
    checksums = PageChecksums(state.page_size)
    checksums.truncate(state.commit)
    header = Header(
        flags=FLAG_COMPRESS if db.compress else 0,
        page_size=state.page_size,
        commit=state.commit,
        min_txid=1,
        max_txid=state.pos.txid,
        timestamp=int(time.time() * 1000),
        pre_apply_checksum=0,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=db.node_id,
    )
    with open(out, "wb") as f:
        enc = Encoder(f, header)
        advance = progress.advance if progress is not None else None
        for pgno, data in _read_pages(db.db_path, db.path(FileKind.WAL), state):
            checksums.set(pgno, page_checksum(pgno, data))
            enc.write_page(pgno, data)
            if advance is not None:
                advance(state.page_size)
        if checksums.total != state.pos.checksum:
            f.close()
            out.unlink(missing_ok=True)
            raise DatabaseError(
                f"snapshot of {db.name} at {state.pos}: database checksum "
                f"{checksums.total:016x} does not match the position; not sending it"
            )
        enc.finish(checksums.total)
        f.flush()
        os.fsync(f.fileno())
    return out


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


__all__ = [
    "CommitInfo",
    "Database",
    "FileKind",
    "Position",
    "errno_for",
    "fsync_dir",
]
