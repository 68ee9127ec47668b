"""Moving whole databases in and out: import a file as one TXID, export, snapshots."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from litefspy.errors import DatabaseError, ReadOnlyError
from litefspy.logs import kv
from litefspy.ltx.apply import apply_files, write_pages
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.encoder import encode_snapshot
from litefspy.ltx.format import FLAG_COMPRESS, Header, lock_pgno
from litefspy.progress import Progress
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import parse_database_header
from litefspy.store import apply, capture, recovery
from litefspy.store.files import validate_sqlite_file
from litefspy.store.locks import HeldLocks
from litefspy.store.types import CommittedState, FileKind, Position

if TYPE_CHECKING:
    from litefspy.store.database import Database
    from litefspy.store.store import Store

log = logging.getLogger(__name__)


def import_file(
    db: Database, src: Path, page_size: int, commit: int, progress: Progress | None = None
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
    db.begin_apply()
    try:
        if progress is not None:
            progress.next_phase("writing the LTX file", size)
        ltx = capture.write_ltx(
            db,
            page_size,
            commit,
            _counted(recovery.all_pages(src_fd, page_size, commit), page_size, progress),
            checksums,
            full=True,
            notify=False,
        )
        assert ltx is not None
        db.close()
        if progress is not None:
            progress.next_phase("writing the database", size)
        fd = os.open(db.db_path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as out:
            pages = _counted(recovery.all_pages(src_fd, page_size, commit), page_size, progress)
            write_pages(out, pages, page_size, commit, zero_lock_page=False)
            os.fsync(out.fileno())
        db.end_apply()
    finally:
        os.close(src_fd)
    # Frames of the old database must never be read again.
    wal = db.path(FileKind.WAL)
    if wal.exists():
        os.truncate(wal, 0)
    db.wal.reset()
    db.dirty.clear()
    db.journal_active = False
    db.is_wal_db = parse_database_header(os.pread(db.db_reader(), DB_HEADER_SIZE, 0)).is_wal
    return ltx


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

    def check(total: int) -> None:
        if total != state.pos.checksum:
            raise DatabaseError(
                f"snapshot of {db.name} at {state.pos}: database checksum "
                f"{total:016x} does not match the position; not sending it"
            )

    on_page = None
    if progress is not None:
        advance, page_size = progress.advance, state.page_size

        def on_page() -> None:
            advance(page_size)

    try:
        with open(out, "wb") as f:
            pages = _read_pages(db.db_path, db.path(FileKind.WAL), state)
            encode_snapshot(f, header, pages, on_page=on_page, check=check)
            f.flush()
            os.fsync(f.fileno())
    except DatabaseError:
        out.unlink(missing_ok=True)
        raise
    return out


async def snapshot(store: Store, name: str, progress: Progress | None = None) -> Path:
    """A verified LTX snapshot of the committed state; the caller deletes the file.

    Taken under SQLite read locks (through the mount) so that no commit or
    checkpoint changes the files while they are read; the commits that happen
    meanwhile in WAL mode only append frames the snapshot does not read.
    `progress` (if given) counts the database's bytes as they are read.
    """
    db = store.require(name)
    held = await store.take_locks(name, db.is_wal_mode(), exclusive=False)
    try:
        state = db.committed_state()
        out = store.incoming_path(name)
        if progress is not None:
            progress.next_phase("building snapshot", state.commit * state.page_size)
        return await trio.to_thread.run_sync(write_snapshot, db, state, out, progress)
    finally:
        await trio.to_thread.run_sync(held.release)


async def import_database(
    store: Store, name: str, src: Path, progress: Progress | None = None
) -> Position:
    """Primary: replace (or create) database `name` with the SQLite file `src`.

    The file is validated first (header, `PRAGMA integrity_check`); then, with
    every SQLite reader and writer of `name` locked out through the mount, the
    import is recorded as one new TXID (replicas receive it like any other) and
    the kernel's and SQLite's caches are invalidated so open connections see
    the new content.
    """
    if not store.writable:
        raise ReadOnlyError(f"cannot import {name}: this node is a replica")
    if progress is not None:
        progress.set_detail("integrity check")
    page_size, commit = await trio.to_thread.run_sync(validate_sqlite_file, src)
    db = store.get(name) or store.create(name)
    wal = db.is_wal_mode()
    # A new database has no SQLite user to lock out (and the mount may be
    # holding lookups of its name until the import is done).
    if progress is not None:
        progress.set_detail("waiting for SQLite locks")
    held = (
        await store.take_locks(name, wal, exclusive=True, writers=True)
        if db.exists()
        else HeldLocks()
    )
    try:
        ltx = await trio.to_thread.run_sync(import_file, db, src, page_size, commit, progress)
        await trio.to_thread.run_sync(apply.after_apply, store, name, wal)
    finally:
        await trio.to_thread.run_sync(held.release)
    log.info("imported database %s", kv(db=name, src=src, pos=db.pos))
    store.feed.publish(db.commit_info(ltx))
    return db.pos


async def export_database(
    store: Store, name: str, out: Path, progress: Progress | None = None
) -> Position:
    """Write a consistent copy of `name` (its committed state) to `out`."""
    db = store.require(name)
    snap = await snapshot(store, name, progress)
    if progress is not None:
        progress.set_detail("writing the copy")
    try:
        tmp = out.with_name(out.name + ".tmp")
        tmp.unlink(missing_ok=True)
        txid, checksum = await trio.to_thread.run_sync(apply_files, tmp, [snap])
        await trio.to_thread.run_sync(os.replace, tmp, out)
    finally:
        snap.unlink(missing_ok=True)
    del db
    return Position(txid, checksum)
