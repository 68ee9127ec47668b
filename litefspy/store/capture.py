"""Commit capture: the write path through the mount, and the LTX file of each commit.

Commits are inferred from file events (DESIGN.md decision 2):

* rollback journal modes: the pages written to `database` while a journal is
  active form the transaction; the journal's invalidation (unlink, truncate to 0,
  or 28 zero bytes written at offset 0) is the commit;
* WAL mode: a valid, fully written commit frame (see `waltrack`).

The LTX file is made durable *before* the event that commits is performed (or,
for WAL, before the write that completed the commit frame returns).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from litefspy.errors import DatabaseError, ReadOnlyError, SQLiteFormatError
from litefspy.logs import kv
from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.ltx.encoder import Encoder
from litefspy.ltx.format import FLAG_COMPRESS, Header, lock_pgno
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import parse_database_header
from litefspy.sqlite.journal import JOURNAL_HEADER_SIZE
from litefspy.store.types import (
    CAPTURED_BYTES_MAX,
    Captured,
    ChecksumChanges,
    CommitInfo,
    FileKind,
    Position,
)
from litefspy.store.waltrack import WALCommit

if TYPE_CHECKING:
    from litefspy.store.database import Database

log = logging.getLogger(__name__)

# journal_mode=PERSIST invalidates a journal by zeroing its header.
ZERO_HEADER = bytes(JOURNAL_HEADER_SIZE)


def write(db: Database, kind: FileKind, fd: int, offset: int, data: bytes) -> int:
    """Write through to the real file and run commit capture for the event."""
    if kind is FileKind.SHM:
        return os.pwrite(fd, data, offset)
    if not (db.writable or _finishing_rollback(db, kind, offset, data)):
        db.check_writable(kind)
    if kind is FileKind.DATABASE:
        return _write_database(db, fd, offset, data)
    if kind is FileKind.JOURNAL:
        return _write_journal(db, fd, offset, data)
    return _write_wal(db, fd, offset, data)


def _finishing_rollback(db: Database, kind: FileKind, offset: int, data: bytes) -> bool:
    """On a node that just lost the primary role, let SQLite finish rolling back.

    A connection that was mid-transaction when the node was demoted puts the
    original pages back into the database and then invalidates its journal;
    both are allowed while the journal is active. The invalidation itself is
    checked in `_commit_then`: it must leave the committed state unchanged.
    """
    if not db.journal_active:
        return False
    if kind is FileKind.DATABASE:
        return True
    return kind is FileKind.JOURNAL and _is_journal_invalidation(offset, data)


def _write_database(db: Database, fd: int, offset: int, data: bytes) -> int:
    if not (db.journal_active or db.is_wal_db or db.wal.header is not None):
        raise DatabaseError(
            f"write to {db.name} refused: no transaction is open (no rollback journal "
            "and not in WAL mode). litefspy replicates SQLite transactions only; "
            "journal_mode=MEMORY/OFF and non-SQLite writes are not supported "
            "(use `litefspy import` to load a database file)"
        )
    if offset < DB_HEADER_SIZE:
        _check_header_write(db, offset, data)
    written = os.pwrite(fd, data, offset)
    if db.journal_active:
        page_size = _page_size_hint(db, offset, data)
        first = offset // page_size + 1
        last = (offset + written - 1) // page_size + 1
        db.dirty.update(range(first, last + 1))
    return written


def _check_header_write(db: Database, offset: int, data: bytes) -> None:
    if offset == 0 and len(data) >= DB_HEADER_SIZE:
        try:
            parse_database_header(data[:DB_HEADER_SIZE])
        except SQLiteFormatError as exc:
            raise DatabaseError(f"write to {db.name} refused: {exc}") from exc


def _page_size_hint(db: Database, offset: int, data: bytes) -> int:
    if offset == 0 and len(data) >= DB_HEADER_SIZE:
        return parse_database_header(data[:DB_HEADER_SIZE]).page_size
    if db.checksums is not None:
        return db.checksums.page_size
    raw = os.pread(db.db_reader(), DB_HEADER_SIZE, 0)
    try:
        return parse_database_header(raw).page_size
    except SQLiteFormatError:
        # Smallest SQLite page: marks every page the write can touch.
        return 512


def _write_journal(db: Database, fd: int, offset: int, data: bytes) -> int:
    if _is_journal_invalidation(offset, data):
        # journal_mode=PERSIST invalidates the journal by zeroing its header:
        # this is the commit (or the end of a rollback).
        return _commit_then(db, lambda: os.pwrite(fd, data, offset))
    written = os.pwrite(fd, data, offset)
    db.journal_active = True
    return written


def _write_wal(db: Database, fd: int, offset: int, data: bytes) -> int:
    reader = db.wal_reader()
    backup: tuple[bytes, int] | None = None
    if db.wal.may_complete_commit(reader, offset, data):
        backup = (os.pread(fd, len(data), offset), os.fstat(fd).st_size)
    written = os.pwrite(fd, data, offset)
    commit = db.wal.on_write(reader, offset, written)
    while commit is not None:
        try:
            _capture_wal(db, commit)
        except Exception:
            db.wal.reject()
            if backup is not None:
                # SQLite's WAL recovery trusts every valid commit frame it finds:
                # a commit litefspy could not record must not stay in the file.
                old, size = backup
                os.pwrite(fd, old, offset)
                if offset + len(data) > size:
                    os.ftruncate(fd, max(size, offset + len(old)))
            raise
        db.wal.accept(commit)
        _prune_wal_index(db, commit.commit)
        if db.strict_verify:
            verify_full(db)
        commit = db.wal.next_commit(reader)
    return written


def truncate(db: Database, kind: FileKind, size: int) -> None:
    """ftruncate/truncate of one of the database's files."""
    path = db.path(kind)
    if kind is FileKind.SHM:
        os.truncate(path, size)
        return
    if not (kind is FileKind.JOURNAL and size == 0 and db.journal_active):
        db.check_writable(kind, opening=kind is FileKind.WAL)
    if kind is FileKind.JOURNAL:
        if size == 0:
            _commit_then(db, lambda: os.truncate(path, 0))
        else:
            os.truncate(path, size)
        return
    if kind is FileKind.WAL:
        # Replicas let the last reader truncate the (frameless) WAL.
        os.truncate(path, size)
        db.wal.on_truncate(size)
        return
    if not (db.journal_active or db.is_wal_db or db.wal.header is not None):
        # VACUUM trims the file after its journal is gone: fine as long as
        # nothing of the committed database is cut off.
        committed = db.checksums
        if committed is None or size < committed.page_count * committed.page_size:
            raise DatabaseError(
                f"truncate of {db.name} to {size} bytes refused: no transaction is "
                "open and it would cut off committed pages"
            )
    os.truncate(path, size)


def unlink(db: Database, kind: FileKind) -> None:
    """unlink of one of the database's names."""
    path = db.path(kind)
    if kind is FileKind.SHM:
        path.unlink()
        return
    if not (kind is FileKind.JOURNAL and db.journal_active):
        db.check_writable(kind, opening=kind is FileKind.WAL)
    if kind is FileKind.JOURNAL:
        _commit_then(db, path.unlink)
        return
    if kind is FileKind.WAL:
        path.unlink()
        db.close_wal_reader()
        db.wal.reset()
        return
    delete_database(db)


def _commit_then(db: Database, invalidate: Callable[[], object]) -> int:
    """Record the rollback-journal transaction as LTX, then invalidate the journal."""
    if not db.dirty:
        db.journal_active = False
        result = invalidate()
        return result if isinstance(result, int) else 0
    if not db.writable:
        # Demoted mid-transaction: only a rollback (no change) may complete.
        if _dirty_pages_changed(db):
            raise ReadOnlyError(
                f"commit to {db.name} refused: this node does not take writes any more "
                "(it was demoted, or its halt lock ended)"
            )
        db.journal_active = False
        db.dirty.clear()
        result = invalidate()
        return result if isinstance(result, int) else 0
    prev_pos, prev_checksums = db.pos, db.checksums
    try:
        created = _capture_rollback(db)
    except OSError:
        # No room to record it (a full disk). If SQLite has just rolled the
        # transaction back, the pages are the committed ones again: nothing
        # to record, and the journal may go. Otherwise the commit fails.
        if _dirty_pages_changed(db):
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
                and db.last_changes is not None
                and (db.last_changes.sums is prev_checksums)
            ):
                db.last_changes.rollback()
            db.pos, db.checksums = prev_pos, prev_checksums
        raise
    db.dirty.clear()
    db.journal_active = False
    if db.strict_verify and created is not None:
        verify_full(db)
    return result if isinstance(result, int) else 0


def _dirty_pages_changed(db: Database) -> bool:
    """Do the pages written under the active journal differ from the committed state?"""
    old = db.checksums
    fd = db.db_reader()
    size = os.fstat(fd).st_size
    if old is None:
        return size > 0
    page_size = old.page_size
    if size != old.page_count * page_size:
        return True
    lock = lock_pgno(page_size)
    for pgno in db.dirty:
        if pgno > old.page_count or pgno == lock:
            continue
        data = os.pread(fd, page_size, (pgno - 1) * page_size)
        if page_checksum(pgno, data) != old.get(pgno):
            return True
    return False


def _capture_rollback(db: Database) -> Path | None:
    """Build the LTX file of the pages written since the journal became active."""
    fd = db.db_reader()
    if os.fstat(fd).st_size == 0:
        return None
    try:
        page_size, commit = db.read_db_header(fd)
    except SQLiteFormatError as exc:
        raise DatabaseError(f"cannot capture commit of {db.name}: {exc}") from exc
    old = db.checksums
    full = old is None or old.page_size != page_size or db.pos.txid == 0
    if full:
        candidates: Iterator[int] = iter(range(1, commit + 1))
        base = ChecksumChanges(PageChecksums(page_size))
    else:
        assert old is not None
        extra = range(old.page_count + 1, commit + 1)
        candidates = iter(sorted(p for p in db.dirty.union(extra) if p <= commit))
        base = ChecksumChanges(old)

    def pages() -> Iterator[tuple[int, bytes]]:
        lock = lock_pgno(page_size)
        for pgno in candidates:
            if pgno == lock:
                continue
            data = os.pread(fd, page_size, (pgno - 1) * page_size)
            if len(data) != page_size:
                raise DatabaseError(f"cannot capture commit of {db.name}: page {pgno} is short")
            ck = page_checksum(pgno, data)
            if not full and base.get(pgno) == ck:
                continue
            base.set(pgno, ck)
            yield pgno, data

    base.truncate(commit)
    try:
        path = write_ltx(db, page_size, commit, pages(), base, full=full)
    except BaseException:
        base.rollback()
        raise
    if path is not None:
        db.last_changes = base
    return path


def _capture_wal(db: Database, commit: WALCommit) -> None:
    wal_fd = db.wal_reader()
    header = db.wal.header
    assert header is not None
    page_size = header.page_size
    old = db.checksums
    full = old is None or old.page_size != page_size or db.pos.txid == 0
    base = ChecksumChanges(PageChecksums(page_size) if full or old is None else old)

    def page_at(pgno: int) -> bytes:
        off = commit.pages.get(pgno)
        if off is not None:
            return os.pread(wal_fd, page_size, off)
        return db.read_page(pgno, page_size)

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
        write_ltx(
            db,
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
            db.is_wal_db = parse_database_header(first).is_wal
        except SQLiteFormatError:
            pass


def _prune_wal_index(db: Database, commit: int) -> None:
    for pgno in [p for p in db.wal.index if p > commit]:
        del db.wal.index[pgno]


def write_ltx(
    db: Database,
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
    db.ensure_dirs()
    txid = db.pos.txid + 1
    snapshot = txid == 1
    now_ms = int(time.time() * 1000)
    header = Header(
        flags=FLAG_COMPRESS if db.compress else 0,
        page_size=page_size,
        commit=commit,
        min_txid=txid,
        max_txid=txid,
        timestamp=now_ms,
        pre_apply_checksum=0 if snapshot else db.pos.checksum,
        wal_offset=wal[0],
        wal_size=wal[1],
        wal_salt1=wal[2],
        wal_salt2=wal[3],
        node_id=db.node_id,
    )
    if isinstance(changes, PageChecksums):
        changes = ChecksumChanges(changes)
    checksums = changes.sums
    final = db.ltx_path(txid, txid)
    tmp = final.with_name(final.name + ".tmp")
    wrote = 0
    kept: list[tuple[int, bytes]] | None = []
    with open(tmp, "wb") as f:
        tee = _Tee(f)
        enc = Encoder(cast(BinaryIO, tee), header)
        for pgno, data in pages:
            enc.write_page(pgno, data)
            wrote += 1
            if kept is not None:
                kept.append((pgno, data))
                if wrote * page_size > CAPTURED_BYTES_MAX:
                    kept = None
        if wrote == 0 and not full and commit == changes.original_count:
            f.close()
            tmp.unlink()
            return None
        trailer = enc.finish(checksums.total)
        f.flush()
        size = f.tell()
        if db.forward is not None:
            # Primary first: until it has the transaction, the commit has not
            # happened (a failure undoes it here like a full disk would).
            try:
                db.forward(tmp, txid, checksums.total)
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
        db.unsynced.append(final)
    db.checksums = checksums
    db.pos = Position(txid, checksums.total)
    db.last_commit_ms = now_ms
    db.last_commit_size = size
    if log.isEnabledFor(logging.DEBUG):
        log.debug("commit %s", kv(db=db.name, txid=f"{txid:016x}", pages=wrote))
    if notify:
        captured = None
        if kept is not None and tee.parts is not None:
            ltx = b"".join(tee.parts)
            captured = Captured(header, trailer.post_apply_checksum, tuple(kept), ltx)
        db.announce(CommitInfo(db.name, txid, final, size, now_ms, captured))
    return final


class _Tee:
    """A file being written, and a copy of what was written while it stays small."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.parts: list[bytes] | None = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._f.write(data)
        if self.parts is not None:
            self._size += len(data)
            if self._size > CAPTURED_BYTES_MAX:
                self.parts = None
            else:
                self.parts.append(bytes(data))
        return n


def verify_full(db: Database) -> None:
    """strict-verify: recompute the whole checksum from the committed pages."""
    assert db.checksums is not None
    page_size = db.checksums.page_size
    full = PageChecksums(page_size)
    lock = lock_pgno(page_size)
    for pgno in range(1, db.checksums.page_count + 1):
        if pgno != lock:
            full.set(pgno, page_checksum(pgno, db.read_page(pgno, page_size)))
    full.truncate(db.checksums.page_count)
    if full.total != db.checksums.total:
        raise DatabaseError(
            f"strict-verify failed for {db.name} at txid {db.pos.txid:016x}: "
            f"incremental checksum {db.checksums.total:016x} != full {full.total:016x}"
        )


def delete_database(db: Database) -> None:
    """The application deleted the database: record it (commit 0), remove the files."""
    if db.pos.txid > 0 and db.checksums is not None:
        empty = PageChecksums(db.checksums.page_size)
        write_ltx(db, db.checksums.page_size, 0, iter(()), empty, full=True)
    db.close()
    for kind in (FileKind.DATABASE, FileKind.JOURNAL, FileKind.WAL, FileKind.SHM):
        db.path(kind).unlink(missing_ok=True)
    db.checksums = None
    db.dirty.clear()
    db.journal_active = False
    db.wal.reset()
    db.is_wal_db = False


def _is_journal_invalidation(offset: int, data: bytes) -> bool:
    """journal_mode=PERSIST invalidates the journal by zeroing its first 28 bytes."""
    return offset == 0 and len(data) >= len(ZERO_HEADER) and data[: len(ZERO_HEADER)] == ZERO_HEADER
