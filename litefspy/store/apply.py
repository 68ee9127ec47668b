"""Replica apply: install a received LTX file, then write its pages into the database.

Write-ahead: the LTX file is renamed into `ltx/` (with the apply marker) before
any page changes, so recovery re-applies it after a crash. Pages are written
with every SQLite connection locked out through the mount, then readers are
made to see them (kernel cache, WAL index).

Durability on a replica comes right after visibility, in the same worker
thread and before the next file of the database is applied (`_make_durable`):
the LTX file's data, its name and the apply marker, then the database file;
only then is the marker removed. A replica's readers do not need the fsyncs
(the primary holds every commit durably), its crash safety does:

* a killed process leaves everything in the page cache: the installed file
  and the marker are there before the first page is written, so recovery
  re-applies the file, as before;
* a machine crash before the syncs complete can leave the database with
  some of the newest file's pages. With the marker, recovery rolls forward
  or re-applies the newest file that survived and checks the database
  checksum; whatever it cannot prove correct stays offline and is
  re-snapshotted from the primary. Without the marker (it never reached the
  disk) recovery starts from the database's own checksum, and the position
  it reports is checked by the primary against its history. Earlier files
  were fully durable before this file's pages were written, so only the
  newest file's pages can be missing or torn.

Snapshots and set-aside applies (which remove or move LTX files) and applies
on a primary (forwarded commits, whose writer is told only afterwards) stay
durable before they become visible.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from litefspy.errors import DatabaseError, LTXError, ReplicationError
from litefspy.fsutil import fsync_dir
from litefspy.logs import kv
from litefspy.ltx.apply import write_pages
from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.ltx.decoder import Decoder, read_verified, read_verified_bytes, verify_file
from litefspy.ltx.format import Header, Trailer
from litefspy.ltx.peek import post_apply_checksum
from litefspy.store import recovery
from litefspy.store.database import Database
from litefspy.store.files import read_page_size, valid_database_name
from litefspy.store.locks import Held, HeldLocks
from litefspy.store.types import ChecksumChanges, CommitInfo, FileKind, Position

if TYPE_CHECKING:
    from litefspy.store.store import Store

log = logging.getLogger(__name__)

# LTX files up to this size are verified on the trio thread (a few tens of us).
INLINE_VERIFY_BYTES = 256 * 1024


async def apply_ltx(
    store: Store, name: str, source: Path | bytes, *, set_aside: bool = False
) -> Position:
    """Replica side: apply one complete received LTX file (see module docs).

    `source`: the file, or its bytes as received (verified and applied from
    memory, then written once into `ltx/`). `set_aside` (with a snapshot):
    the primary says this node's history diverged from its own (e.g. a
    deposed primary's unreplicated transactions); the node's LTX files and a
    copy of its database are kept under `<data>/dbs/NAME/aside-<ms>/` instead
    of being dropped.
    """
    pages: list[tuple[int, bytes]] | None = None
    if isinstance(source, bytes):
        if len(source) <= INLINE_VERIFY_BYTES:
            header, trailer, pages = read_verified_bytes(source)
        else:
            header, trailer, pages = await trio.to_thread.run_sync(read_verified_bytes, source)
    elif os.stat(source).st_size <= INLINE_VERIFY_BYTES:
        # A small file verifies faster than a trip to a worker thread and back,
        # and its decoded pages are kept: the apply writes them without a
        # second decode.
        header, trailer, pages = read_verified(source)
    else:
        header, trailer = await trio.to_thread.run_sync(verify_file, source)
    async with store.capture_lock(name):
        return await _apply_verified(
            store, name, source, header, trailer, pages=pages, set_aside=set_aside
        )


async def _apply_verified(
    store: Store,
    name: str,
    source: Path | bytes,
    header: Header,
    trailer: Trailer,
    *,
    pages: list[tuple[int, bytes]] | None,
    set_aside: bool,
) -> Position:
    if name in store.failed and header.is_snapshot:
        # An offline database (its history did not match at startup) is repaired
        # by a snapshot from the primary; what it had is kept aside. No wipe.
        log.warning("repairing offline database from a snapshot %s", kv(db=name))
        del store.failed[name]
        set_aside = True
    db = store.get(name)
    if db is None:
        if not valid_database_name(name):
            raise ReplicationError(f"invalid database name {name!r} from the primary")
        db = store.create(name)
    if _already_applied(db, header, trailer):
        # The primary sent back a transaction this replica forwarded to it
        # (write forwarding): it is already here, byte for byte.
        if isinstance(source, Path):
            await trio.to_thread.run_sync(partial(source.unlink, missing_ok=True))
        return db.pos
    deletion = header.commit == 0
    continues = follows(db, header)
    if deletion and not continues and not header.is_snapshot:
        # The primary deleted the database: that holds whatever this replica had,
        # which is kept aside if it does not lead to the deletion.
        log.warning(
            "database deleted on the primary; keeping this replica's diverged copy aside %s",
            kv(db=name, pos=db.pos),
        )
        set_aside = True
    elif not header.is_snapshot and not continues:
        raise ReplicationError(
            f"LTX {header.min_txid:016x}-{header.max_txid:016x} for {name} does not "
            f"continue position {db.pos} (pre-apply {header.pre_apply_checksum:016x})"
        )
    if (
        db.checksums is not None
        and not header.is_snapshot
        and not deletion
        and (db.checksums.page_size != header.page_size)
    ):
        raise ReplicationError(f"page size change for {name} needs a snapshot")
    final = db.ltx_path(header.min_txid, header.max_txid)
    # The database's own checksums, changed in place with an undo record
    # (_write_applied): no O(database size) copy per transaction.
    current = None if deletion else db.checksums
    wal = db.is_wal_mode()

    locks = store.locks

    def apply_in_thread() -> tuple[PageChecksums, OSError | None]:
        # One worker thread for the whole apply: each trio <-> thread hop costs
        # more than the work for a small transaction (replication lag).
        lock = (lambda: locks.exclusive(name, wal)) if locks is not None else HeldLocks
        ask = (lambda: locks.request_exclusive(name, wal)) if locks is not None else None
        after = apply_locked(
            store,
            db,
            header,
            trailer,
            src=source,
            final=final,
            current=current,
            pages=pages,
            lock=lock,
            set_aside=set_aside,
            visible_first=True,
            ask_lock=ask,
        )
        try:
            _make_durable(db, final)
        except OSError as exc:
            return after, exc
        return after, None

    after, unsynced = await trio.to_thread.run_sync(apply_in_thread)
    pos = Position(header.max_txid, trailer.post_apply_checksum)
    # Readers already see it: the position follows the database file.
    db.applied(pos, after if header.commit else None)
    if unsynced is not None:
        # The apply marker stays: a restart's recovery re-checks the database.
        raise DatabaseError(
            f"applied {final.name} to {name} but could not make it durable ({unsynced}); "
            "the next stream asks for a snapshot"
        )
    store.feed.publish(
        CommitInfo(name, header.max_txid, final, final.stat().st_size, header.timestamp)
    )
    return pos


def apply_locked(
    store: Store,
    db: Database,
    header: Header,
    trailer: Trailer,
    *,
    src: Path | bytes,
    final: Path,
    current: PageChecksums | None,
    pages: list[tuple[int, bytes]] | None,
    lock: Callable[[], Held],
    set_aside: bool,
    visible_first: bool = False,
    ask_lock: Callable[[], Callable[[], Held]] | None = None,
) -> PageChecksums:
    """Worker thread: install the LTX file, then with `lock()` held write its pages.

    Anything besides the database file that readers would see goes first: a
    replica's WAL frames or hot journal left by writes a halt lock allowed
    (a forwarded commit the primary did not confirm), a primary's own WAL
    under a forwarded commit. Only the committed state may stay under the
    new pages.

    `visible_first` (a replica's incremental file): the pages become visible
    before they are synced, and the caller must call `_make_durable` next
    (see the module docs). Otherwise everything is durable first.
    `ask_lock` (instead of `lock`): asks for the locks before the file is
    installed and returns the function that waits for them, so the lock
    keeper takes them meanwhile; no page is written before both are done.
    """
    wal = db.is_wal_mode()
    sync_first = not visible_first or header.is_snapshot or set_aside
    # Whether a name of the database may appear or go (the kernel's cached
    # entries must then be dropped too): a new database, a deletion, a
    # snapshot (removes a journal), settling (removes a journal).
    renames = header.is_snapshot or header.commit == 0 or not db.exists()
    waiting = ask_lock() if ask_lock is not None else None
    try:
        _install_ltx(db, header, src, final, set_aside, sync=sync_first)
    except BaseException:
        if waiting is not None:
            waiting().release()
        raise
    held = waiting() if waiting is not None else lock()
    try:
        if recovery.needs_settling(db):
            renames = True
            recovery.settle(db, verify=False)
        after = _write_applied(db, final, header, trailer, current, pages=pages, sync=sync_first)
        if sync_first:
            db.end_apply()
        after_apply(store, db.name, wal, held, entries=renames)
        return after
    finally:
        held.release()  # no-op once after_apply released it


def _make_durable(db: Database, final: Path) -> None:
    """Worker thread, after a `visible_first` apply: the LTX file's data, its name
    (and the apply marker), the database file; then the marker goes.

    Harmless after an apply that was durable already (the marker is gone).
    """
    if not db.apply_marker.exists():
        return
    fd = os.open(final, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fsync_dir(db.ltx_dir)
    if db.db_path.exists():
        fd = os.open(db.db_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    db.end_apply()


def _already_applied(db: Database, header: Header, trailer: Trailer) -> bool:
    """Is this incremental LTX file one this database already has (same TXID, same result)?"""
    if header.is_snapshot or header.max_txid > db.pos.txid:
        return False
    if header.max_txid == db.pos.txid:
        return trailer.post_apply_checksum == db.pos.checksum
    local = db.ltx_path(header.min_txid, header.max_txid)
    try:
        return post_apply_checksum(local) == trailer.post_apply_checksum
    except OSError:
        return False


def _install_ltx(
    db: Database, header: Header, src: Path | bytes, final: Path, set_aside: bool, *, sync: bool
) -> None:
    """Write-ahead: the file is in ltx/ before the database changes (recovery re-applies).

    With `sync`, durably so; otherwise it is in the page cache (which a killed
    process does not lose) and `_make_durable` syncs it after the apply.
    """
    db.ensure_dirs()
    if header.is_snapshot or set_aside:
        ahead = db.pos.txid > header.max_txid
        old = [p for _, _, p in db.ltx_files()]
        if (ahead or set_aside) and old:
            aside = db.dir / f"aside-{int(time.time() * 1000)}"
            aside.mkdir()
            if db.exists():
                shutil.copyfile(db.db_path, aside / "database")
            for p in old:
                os.rename(p, aside / p.name)
            fsync_dir(aside)
            log.warning(
                "replica history diverged from the primary; its LTX files were set aside %s",
                kv(db=db.name, pos=db.pos, path=aside),
            )
        else:
            for p in old:
                p.unlink(missing_ok=True)
    db.begin_apply()
    if isinstance(src, bytes):
        # Written once, here: a crash mid-write leaves a .tmp file that startup
        # recovery keeps only if it verifies.
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(src)
            if sync:
                f.flush()
                os.fdatasync(f.fileno())
        os.rename(tmp, final)
    else:
        os.rename(src, final)
    if sync:
        fsync_dir(db.ltx_dir)


def _write_applied(
    db: Database,
    ltx: Path,
    header: Header,
    trailer: Trailer,
    current: PageChecksums | None,
    *,
    pages: list[tuple[int, bytes]] | None,
    sync: bool = True,
) -> PageChecksums:
    """Write the pages that differ (worker thread, exclusive locks held).

    `current` is the database's own checksums: an incremental file changes
    them in place with an undo record (rolled back on any failure); a
    snapshot starts afresh and still compares against `current` to skip
    unchanged pages. `pages`: the file's pages, already decoded and verified
    (small files): the result is checked before the database changes.
    Otherwise the file is decoded here as it is written.
    """
    page_size = header.page_size
    if current is not None and current.page_size != page_size:
        current = None
    changes = None
    if header.is_snapshot or current is None:
        after = PageChecksums(page_size)
        track: PageChecksums | ChecksumChanges = after
    else:
        after = current
        track = changes = ChecksumChanges(current)
    try:
        todo: list[tuple[int, bytes]] | None = None
        if pages is not None:
            todo = []
            for pgno, data in pages:
                ck = page_checksum(pgno, data)
                if current is None or current.get(pgno) != ck:
                    todo.append((pgno, data))
                track.set(pgno, ck)
            track.truncate(header.commit)
            if header.commit:
                _check_result(db, ltx, after, trailer)
        if header.is_snapshot:
            # Nothing of the old state may overlay the snapshot for readers.
            db.path(FileKind.JOURNAL).unlink(missing_ok=True)
            wal_path = db.path(FileKind.WAL)
            if wal_path.exists():
                os.truncate(wal_path, 0)
        fd = os.open(db.db_path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as out:
            if todo is not None:
                write_pages(out, todo, page_size, header.commit, zero_lock_page=header.is_snapshot)
            else:
                with open(ltx, "rb") as f:

                    def changed() -> Iterator[tuple[int, bytes]]:
                        for pgno, data in Decoder(f).pages():
                            ck = page_checksum(pgno, data)
                            if current is None or current.get(pgno) != ck:
                                yield pgno, data
                            track.set(pgno, ck)

                    write_pages(
                        out, changed(), page_size, header.commit, zero_lock_page=header.is_snapshot
                    )
                track.truncate(header.commit)
            if sync:
                os.fsync(out.fileno())
        if header.commit == 0:
            for kind in FileKind:
                if kind is not FileKind.SHM:
                    db.path(kind).unlink(missing_ok=True)
        else:
            _check_result(db, ltx, after, trailer)
    except BaseException:
        if changes is not None:
            changes.rollback()
        raise
    return after


def after_apply(
    store: Store, name: str, wal: bool, held: Held | None = None, *, entries: bool = True
) -> None:
    """Worker thread, locks held: make readers see the new pages.

    With `held`, the locks are released too: in the same call to the lock
    keeper as the WAL-index reset (one round trip fewer per replica apply).
    `entries=False`: no name of the database was created or removed, so the
    kernel keeps its cached entries (pages and attributes are dropped).
    """
    if store.invalidator is not None:
        store.invalidator.invalidate_database(name, entries=entries)
    db = store.get(name)
    locks = store.locks
    if wal and locks is not None and db is not None:
        page_size = read_page_size(db.db_path)
        if page_size:
            if held is not None:
                locks.reset_and_release(held, name, page_size)
                return
            locks.reset_wal_index(name, page_size)
    if held is not None:
        held.release()


def follows(db: Database, header: Header) -> bool:
    """Does the LTX file start right after the database's position?"""
    return header.min_txid == db.pos.txid + 1 and header.pre_apply_checksum == db.pos.checksum


def _check_result(db: Database, ltx: Path, after: PageChecksums, trailer: Trailer) -> None:
    if after.total != trailer.post_apply_checksum:
        raise LTXError(
            f"applying {ltx.name} to {db.name} gave checksum {after.total:016x}, "
            f"expected {trailer.post_apply_checksum:016x}"
        )
