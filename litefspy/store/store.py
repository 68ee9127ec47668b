"""All databases of one node: discovery, recovery, role, and commit notification."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from litefspy.errors import (
    DatabaseError,
    LitefspyError,
    LTXError,
    NotFoundError,
    ReadOnlyError,
    RecoveryError,
    ReplicationError,
)
from litefspy.fsutil import fsync_dir, sync_files
from litefspy.logs import kv
from litefspy.ltx.apply import apply_files
from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.ltx.decoder import Decoder, read_verified, verify_file
from litefspy.ltx.format import Header, Trailer, lock_pgno
from litefspy.ltx.peek import post_apply_checksum
from litefspy.progress import Progress, ProgressBoard
from litefspy.sqlite.journal import (
    JOURNAL_HEADER_SIZE,
    parse_journal_header,
    read_super_journal_name,
    super_journal_children,
)
from litefspy.store import recovery, transfer
from litefspy.store.database import Database
from litefspy.store.files import (
    is_super_journal_name,
    load_node_id,
    read_page_size,
    valid_database_name,
    validate_sqlite_file,
)
from litefspy.store.keeper import LockKeeper
from litefspy.store.locks import Held, HeldLocks
from litefspy.store.owner import lock_data_dir
from litefspy.store.types import ChecksumChanges, CommitInfo, FileKind, Forwarder, Position

T = TypeVar("T")
log = logging.getLogger(__name__)

# LTX files up to this size are verified on the trio thread (a few tens of us).
INLINE_VERIFY_BYTES = 256 * 1024


class CacheInvalidator(Protocol):
    """The FUSE layer's hook to drop the kernel's caches of one database."""

    def invalidate_database(self, name: str) -> None:
        """Invalidate cached pages, attributes and entries of every file of `name`."""


@dataclass
class Halt:
    """A halt lock the primary holds for a replica (write forwarding, litefspy.halt).

    `held` pauses the database's SQLite writers on this node; `expires` (trio
    clock) moves forward with every renewal or forwarded commit; `lock` keeps
    one forwarded commit at a time and lets `end_halt` wait for one in flight.
    """

    id: str
    name: str
    holder: str
    ttl: float
    held: Held
    wal: bool
    expires: float = 0.0
    active: bool = True
    lock: trio.Lock = field(default_factory=trio.Lock)
    ended: trio.Event = field(default_factory=trio.Event)

    def renew(self) -> None:
        self.expires = trio.current_time() + self.ttl


class Store:
    """The databases under `<data>/dbs/`, their role (writable or not) and listeners."""

    def __init__(
        self,
        data_dir: Path,
        *,
        compress: bool = True,
        strict_verify: bool = False,
        mount_dir: Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        # Before anything in data.dir is touched: one node per directory.
        self._owner_fd = lock_data_dir(self.data_dir)
        self.dbs_dir = self.data_dir / "dbs"
        self.compress = compress
        self.strict_verify = strict_verify
        self.dbs_dir.mkdir(parents=True, exist_ok=True)
        # SQLite's super-journals (MAIN-mjXXXXXXXXX in the mount): local bookkeeping
        # of multi-database commits, passed through and never replicated.
        self.super_dir = self.data_dir / "superjournals"
        self.super_dir.mkdir(exist_ok=True)
        # Where applications see the files: a journal records its super-journal's
        # path there. Resolved once, now, so that recovery never looks at the mount.
        self.mount_dir = _canonical(mount_dir) if mount_dir is not None else None
        self.node_id = load_node_id(self.data_dir)
        self._dbs: dict[str, Database] = {}
        # Databases whose recovery refused to guess: name -> message. They stay offline.
        self.failed: dict[str, str] = {}
        self._listeners: list[Callable[[CommitInfo], None]] = []
        self.writable = True
        self.tmp_dir = self.data_dir / "tmp"
        self._locks: LockKeeper | None = None
        self._invalidator: CacheInvalidator | None = None
        # Primary: halt locks held for replicas, by database name.
        self.halts: dict[str, Halt] = {}
        # Backups: the newest TXID uploaded per database. Local retention keeps
        # every LTX file after it (the backup still needs them).
        self.keep_from: dict[str, int] = {}
        # Per database: held by a forwarded commit's capture (write forwarding, in a
        # worker thread) and by a replica apply, so the two never interleave.
        self._capture_locks: dict[str, trio.Lock] = {}
        # Long work in progress (startup check, import, export, snapshots): status shows it.
        self.progress = ProgressBoard()

    def capture_lock(self, name: str) -> trio.Lock:
        """The lock that keeps a forwarded capture and a replica apply of `name` apart."""
        lock = self._capture_locks.get(name)
        if lock is None:
            lock = self._capture_locks[name] = trio.Lock()
        return lock

    async def file_op(self, db: Database, op: Callable[[], T]) -> T:
        """Run a write, truncate or unlink of one of `db`'s files (FUSE handlers).

        Normally right here on the trio thread: capture is quick. A database this
        replica holds a halt lock on forwards each commit to the primary before it
        completes (a network round trip, up to halt.COMMIT_TIMEOUT): that runs in a
        worker thread, so the node's streams, heartbeats, RPCs and proxy go on.
        """
        if db.forward is None:
            return op()
        async with self.capture_lock(db.name):
            db.hold_notices()
            try:
                return await trio.to_thread.run_sync(op)
            finally:
                db.release_notices()

    def open(self) -> None:
        """Recover every database found on disk."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.listdir(self.dbs_dir)):
            if not (self.dbs_dir / entry).is_dir() or not valid_database_name(entry):
                continue
            db = self._make(entry)
            # Recovery runs in a worker thread while the node already answers
            # Status: its records reach no listener, and the database is listed
            # once it is ready.
            db.on_commit = None
            try:
                recovery.recover(db)
            except RecoveryError as exc:
                log.error("database offline: %s", exc)
                self.failed[entry] = str(exc)
                db.close()
                continue
            db.on_commit = self._notify
            self._dbs[entry] = db
            log.info("database ready %s", kv(db=entry, pos=db.pos))
        self._remove_finished_super_journals()

    # ------------------------------------------------------ super-journals

    def super_journal_file(self, name: str) -> Path:
        """Where the super-journal the mount shows as `name` really is."""
        return self.super_dir / name

    def super_journal_exists(self, recorded: str) -> bool:
        """Does the super-journal a journal points to exist, as SQLite would find it?

        The journal records the path the application used: in the mount for a
        main database there (resolved to `super_dir`, never by touching the
        mount), or anywhere else for a main database outside the mount.
        """
        path = Path(recorded)
        in_mount = self.mount_dir is not None and _canonical(path.parent) == self.mount_dir
        if in_mount or self.mount_dir is None:
            return is_super_journal_name(path.name) and self.super_journal_file(path.name).exists()
        return path.exists()

    def _remove_finished_super_journals(self) -> None:
        """After recovery, delete super-journals no hot journal points to (SQLite's rule).

        A super-journal stays while any journal it lists still needs it (e.g. one
        of a database outside the mount, which SQLite will roll back later).
        """
        for entry in sorted(os.listdir(self.super_dir)):
            path = self.super_dir / entry
            if not any(self._still_needs(child, entry) for child in _children(path)):
                path.unlink(missing_ok=True)
                log.info("removed finished super-journal %s", kv(name=entry))

    def _still_needs(self, journal: str, super_name: str) -> bool:
        """Is `journal` (a path as SQLite recorded it) hot and pointing at `super_name`?"""
        jpath = Path(journal)
        if self.mount_dir is not None and _canonical(jpath.parent) == self.mount_dir:
            name = jpath.name.removesuffix(FileKind.JOURNAL.value)
            db = self._dbs.get(name)
            if db is None:
                return False
            jpath = db.path(FileKind.JOURNAL)
        try:
            with open(jpath, "rb") as f:
                if parse_journal_header(f.read(JOURNAL_HEADER_SIZE)) is None:
                    return False
                pointer = read_super_journal_name(f)
        except OSError:
            return False
        return pointer is not None and Path(pointer).name == super_name

    def close(self) -> None:
        self.detach_mount()
        for db in self._dbs.values():
            try:
                db.sync_pending()
                recovery.write_clean_record(db)
            except OSError as exc:
                log.error("could not sync LTX files at shutdown %s: %s", kv(db=db.name), exc)
            db.close()
        if self._owner_fd >= 0:
            os.close(self._owner_fd)
            self._owner_fd = -1

    async def run_flusher(self, interval: float = 1.0) -> None:
        """Background task: fsync LTX files of WAL commits within `interval` seconds.

        Applications using synchronous=NORMAL never fsync their WAL per commit;
        this bounds how much of the LTX history a power loss can take with it.
        """
        while True:
            await trio.sleep(interval)
            for db in self.databases():
                if db.unsynced:
                    pending = db.take_unsynced()
                    await trio.to_thread.run_sync(sync_files, pending, db.ltx_dir)

    def _make(self, name: str) -> Database:
        db = Database(
            name,
            self.dbs_dir,
            node_id=self.node_id,
            compress=self.compress,
            strict_verify=self.strict_verify,
            on_commit=self._notify,
            super_journal_exists=self.super_journal_exists,
        )
        db.writable = self.writable
        db.progress = self.progress
        return db

    def _notify(self, info: CommitInfo) -> None:
        for listener in list(self._listeners):
            listener(info)

    def subscribe(self, listener: Callable[[CommitInfo], None]) -> Callable[[], None]:
        """Call `listener` after every new LTX file; returns an unsubscribe function.

        Listeners run inside the FUSE handler that committed, so they must only
        record the fact (e.g. set a trio.Event), never block.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set_writable(self, writable: bool) -> None:
        """Primary (True) or replica (False)."""
        self.writable = writable
        for db in self._dbs.values():
            db.writable = writable
            if writable:
                db.forward = None

    def accepts_writes(self, name: str) -> bool:
        """The node is the primary, or holds a halt lock on `name` (write forwarding)."""
        db = self._dbs.get(name)
        return self.writable or (db is not None and db.writable)

    def get_if_online(self, name: str) -> Database | None:
        """The database if it is known and online (never raises)."""
        return self._dbs.get(name)

    def get(self, name: str) -> Database | None:
        """The database, or None if unknown. Offline databases raise NotFoundError."""
        if name in self.failed:
            raise NotFoundError(self.failed[name])
        return self._dbs.get(name)

    def create(self, name: str) -> Database:
        """Get or create a database (the application created NAME through the mount)."""
        db = self.get(name)
        if db is not None:
            return db
        if not valid_database_name(name):
            raise DatabaseError(f"invalid database name {name!r}")
        db = self._make(name)
        db.ensure_dirs()
        self._dbs[name] = db
        return db

    def databases(self) -> list[Database]:
        dbs = dict(self._dbs)  # a copy first: `open` may add one meanwhile (worker thread)
        return [dbs[n] for n in sorted(dbs)]

    def drop_uncommitted(self, name: str) -> bool:
        """Undo the creation of a database file that never held a transaction.

        For a file created through the mount whose first write was refused (not
        SQLite): it must not stay behind as an empty "database". A database that
        never had any history disappears entirely; one deleted before (its
        history ends with the deletion) is deleted again. False, touching
        nothing, if the file (or a journal or WAL) has any content.
        """
        db = self._dbs.get(name)
        if db is None or db.checksums is not None:
            return False
        for kind in (FileKind.DATABASE, FileKind.JOURNAL, FileKind.WAL):
            try:
                if db.path(kind).stat().st_size > 0:
                    return False
            except FileNotFoundError:
                continue
        db.close()
        for kind in (FileKind.DATABASE, FileKind.JOURNAL, FileKind.WAL, FileKind.SHM):
            db.path(kind).unlink(missing_ok=True)
        if db.pos.txid == 0 and not any(db.ltx_dir.glob("*.ltx")):
            del self._dbs[name]
            shutil.rmtree(db.dir, ignore_errors=True)
            fsync_dir(self.dbs_dir)
        else:
            fsync_dir(db.dir)
        log.info("removed the empty database a refused write left %s", kv(db=name))
        return True

    # --------------------------------------------------------- replication

    def attach_mount(self, mountpoint: Path, invalidator: CacheInvalidator) -> None:
        """Locks are taken through the mount, and kernel caches invalidated, from now on.

        The locks live in a separate keeper process (see keeper.py): this
        process never makes a system call on its own mount.
        """
        self._locks = LockKeeper(Path(mountpoint))
        self._locks.start()
        self._invalidator = invalidator

    @property
    def lock_keeper_pid(self) -> int | None:
        """The process that takes litefspy's locks through the mount (if any)."""
        return self._locks.pid if self._locks is not None else None

    def detach_mount(self) -> None:
        """Let go of every lock and descriptor on the mount (before unmounting)."""
        locks, self._locks = self._locks, None
        if locks is not None:
            locks.close()

    def incoming_path(self, name: str) -> Path:
        """A fresh temp path, on the data filesystem, to receive an LTX file into."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{name}.{secrets.token_hex(6)}.ltx.tmp"

    def _require(self, name: str) -> Database:
        db = self.get(name)
        if db is None:
            raise NotFoundError(f"no database named {name}")
        return db

    async def snapshot(self, name: str, progress: Progress | None = None) -> Path:
        """A verified LTX snapshot of the committed state; the caller deletes the file.

        Taken under SQLite read locks (through the mount) so that no commit or
        checkpoint changes the files while they are read; the commits that happen
        meanwhile in WAL mode only append frames the snapshot does not read.
        `progress` (if given) counts the database's bytes as they are read.
        """
        db = self._require(name)
        held = await self._lock(name, db.is_wal_mode(), exclusive=False)
        try:
            state = db.committed_state()
            out = self.incoming_path(name)
            if progress is not None:
                progress.next_phase("building snapshot", state.commit * state.page_size)
            return await trio.to_thread.run_sync(transfer.write_snapshot, db, state, out, progress)
        finally:
            await trio.to_thread.run_sync(held.release)

    async def _lock(self, name: str, wal: bool, *, exclusive: bool, writers: bool = False) -> Held:
        locks = self._locks
        if locks is None:
            return HeldLocks()
        if exclusive:
            return await trio.to_thread.run_sync(locks.exclusive, name, wal, writers)
        return await trio.to_thread.run_sync(locks.read, name, wal)

    async def apply_ltx(self, name: str, path: Path, *, set_aside: bool = False) -> Position:
        """Replica side: apply one complete received LTX file (see module docs).

        `set_aside` (with a snapshot): the primary says this node's history diverged
        from its own (e.g. a deposed primary's unreplicated transactions); the
        node's LTX files and a copy of its database are kept under
        `<data>/dbs/NAME/aside-<ms>/` instead of being dropped.
        """
        pages: list[tuple[int, bytes]] | None = None
        if os.stat(path).st_size <= INLINE_VERIFY_BYTES:
            # A small file verifies faster than a trip to a worker thread and back,
            # and its decoded pages are kept: the apply writes them without a
            # second decode.
            header, trailer, pages = read_verified(path)
        else:
            header, trailer = await trio.to_thread.run_sync(verify_file, path)
        async with self.capture_lock(name):
            return await self._apply_verified(
                name, path, header, trailer, pages=pages, set_aside=set_aside
            )

    async def _apply_verified(
        self,
        name: str,
        path: Path,
        header: Header,
        trailer: Trailer,
        *,
        pages: list[tuple[int, bytes]] | None,
        set_aside: bool,
    ) -> Position:
        if name in self.failed and header.is_snapshot:
            # An offline database (its history did not match at startup) is repaired
            # by a snapshot from the primary; what it had is kept aside. No wipe.
            log.warning("repairing offline database from a snapshot %s", kv(db=name))
            del self.failed[name]
            set_aside = True
        db = self.get(name)
        if db is None:
            if not valid_database_name(name):
                raise ReplicationError(f"invalid database name {name!r} from the primary")
            db = self.create(name)
        if self._already_applied(db, header, trailer):
            # The primary sent back a transaction this replica forwarded to it
            # (write forwarding): it is already here, byte for byte.
            await trio.to_thread.run_sync(partial(path.unlink, missing_ok=True))
            return db.pos
        deletion = header.commit == 0
        continues = _continues(db, header)
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

        locks = self._locks

        def apply_in_thread() -> PageChecksums:
            # One worker thread for the whole apply: each trio <-> thread hop costs
            # more than the work for a small transaction (replication lag).
            lock = (lambda: locks.exclusive(name, wal)) if locks is not None else HeldLocks
            return self._apply_locked(
                db,
                header,
                trailer,
                src=path,
                final=final,
                current=current,
                pages=pages,
                lock=lock,
                set_aside=set_aside,
            )

        after = await trio.to_thread.run_sync(apply_in_thread)
        pos = Position(header.max_txid, trailer.post_apply_checksum)
        db.applied(pos, after if header.commit else None)
        self._notify(
            CommitInfo(name, header.max_txid, final, final.stat().st_size, header.timestamp)
        )
        return pos

    def _apply_locked(
        self,
        db: Database,
        header: Header,
        trailer: Trailer,
        *,
        src: Path,
        final: Path,
        current: PageChecksums | None,
        pages: list[tuple[int, bytes]] | None,
        lock: Callable[[], Held],
        set_aside: bool,
    ) -> PageChecksums:
        """Worker thread: install the LTX file, then with `lock()` held write its pages.

        Anything besides the database file that readers would see goes first: a
        replica's WAL frames or hot journal left by writes a halt lock allowed
        (a forwarded commit the primary did not confirm), a primary's own WAL
        under a forwarded commit. Only the committed state may stay under the
        new pages.
        """
        wal = db.is_wal_mode()
        self._install_ltx(db, header, src, final, set_aside)
        held = lock()
        try:
            if recovery.needs_settling(db):
                recovery.settle(db, verify=False)
            after = self._write_applied(db, final, header, trailer, current, pages=pages)
            db.end_apply()
            self._after_apply(db.name, wal, held)
            return after
        finally:
            held.release()  # no-op once _after_apply released it

    @staticmethod
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
        self, db: Database, header: Header, src: Path, final: Path, set_aside: bool
    ) -> None:
        """Write-ahead: the file is in ltx/ before the database changes (recovery re-applies)."""
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
        os.rename(src, final)
        fsync_dir(db.ltx_dir)

    @staticmethod
    def _write_applied(
        db: Database,
        ltx: Path,
        header: Header,
        trailer: Trailer,
        current: PageChecksums | None,
        *,
        pages: list[tuple[int, bytes]] | None,
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
            try:
                if todo is not None:
                    for pgno, data in todo:
                        os.pwrite(fd, data, (pgno - 1) * page_size)
                else:
                    with open(ltx, "rb") as f:
                        for pgno, data in Decoder(f).pages():
                            ck = page_checksum(pgno, data)
                            if current is None or current.get(pgno) != ck:
                                os.pwrite(fd, data, (pgno - 1) * page_size)
                            track.set(pgno, ck)
                    track.truncate(header.commit)
                lock = lock_pgno(page_size)
                if header.is_snapshot and header.commit >= lock:
                    os.pwrite(fd, bytes(page_size), (lock - 1) * page_size)
                os.ftruncate(fd, header.commit * page_size)
                os.fsync(fd)
            finally:
                os.close(fd)
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

    def _after_apply(self, name: str, wal: bool, held: Held | None = None) -> None:
        """Worker thread, locks held: make readers see the new pages.

        With `held`, the locks are released too: in the same call to the lock
        keeper as the WAL-index reset (one round trip fewer per replica apply).
        """
        if self._invalidator is not None:
            self._invalidator.invalidate_database(name)
        db = self.get(name)
        locks = self._locks
        if wal and locks is not None and db is not None:
            page_size = read_page_size(db.db_path)
            if page_size:
                if held is not None:
                    locks.reset_and_release(held, name, page_size)
                    return
                locks.reset_wal_index(name, page_size)
        if held is not None:
            held.release()

    # ------------------------------------------------------------ roles

    async def demote(self) -> None:
        """Primary -> replica: refuse writes at once, then leave only committed state.

        Connections mid-transaction may still roll back (see Database); once no
        SQLite connection holds a lock, litefspy rolls back any hot journal itself
        and folds the captured WAL frames into the database file. A database
        that cannot be settled gets position 0 so the new primary re-snapshots it.
        """
        self.set_writable(False)
        for halt in list(self.halts.values()):
            log.warning(
                "halt lock dropped: this node is no longer the primary %s",
                kv(db=halt.name, holder=halt.holder),
            )
            await self.end_halt(halt)
        for db in self.databases():
            await self._settle_database(db, "demotion")

    async def _settle_database(self, db: Database, why: str, *, verify: bool = True) -> None:
        """Lock every SQLite connection out and leave only committed state (recovery.settle).

        A database that cannot be settled gets position 0, so the primary
        re-snapshots it.
        """
        wal = db.is_wal_mode()
        try:
            held = await self._lock(db.name, wal, exclusive=True, writers=True)
        except DatabaseError as exc:
            log.error("could not lock database to settle it %s: %s", kv(db=db.name, after=why), exc)
            return
        try:
            done = await trio.to_thread.run_sync(partial(recovery.settle, db, verify=verify))
            await trio.to_thread.run_sync(self._after_apply, db.name, wal)
        except (OSError, DatabaseError) as exc:
            log.error("database needs a snapshot %s: %s", kv(db=db.name, after=why), exc)
            db.pos = Position(0, 0)
            return
        finally:
            await trio.to_thread.run_sync(held.release)
        if done:
            log.info("settled database %s: %s", kv(db=db.name, after=why), done)

    def promote(self) -> None:
        """Replica -> primary: accept writes (the caller has caught up first)."""
        self.set_writable(True)

    # -------------------------------------------- write forwarding (halt lock)

    async def begin_halt(self, name: str, holder: str, ttl: float, patience: float) -> Halt:
        """Primary: pause the SQLite writers of `name` on this node for a replica.

        Waits up to `patience` seconds for another halt on the database to end and
        for the writers in progress to finish. Readers are not affected.
        """
        if not self.writable:
            raise ReadOnlyError(f"cannot halt {name}: this node is not the primary")
        db = self.get(name)
        if db is None or not db.exists() or db.pos.txid == 0:
            raise NotFoundError(
                f"database {name} does not exist on the primary; create it there first"
            )
        locks = self._locks
        if locks is None:
            raise DatabaseError("halt locks need the mount")
        with trio.move_on_after(patience):
            while (current := self.halts.get(name)) is not None:
                await current.ended.wait()
        if current is not None:
            raise DatabaseError(
                f"cannot halt {name}: {current.holder} holds its halt lock (waited {patience:g} s)"
            )
        wal = db.is_wal_mode()
        try:
            held = await trio.to_thread.run_sync(locks.writers, name, wal, patience)
        except DatabaseError as exc:
            raise DatabaseError(f"cannot halt {name}: writers did not finish ({exc})") from None
        if not self.writable or name in self.halts:
            await trio.to_thread.run_sync(held.release)
            raise DatabaseError(f"cannot halt {name}: the node's role changed meanwhile")
        halt = Halt(secrets.token_hex(8), name, holder, ttl, held, wal)
        halt.renew()
        self.halts[name] = halt
        log.info("halt lock granted %s", kv(db=name, holder=holder, pos=db.pos))
        return halt

    async def end_halt(self, halt: Halt) -> None:
        """Primary: let the writers go on (waits for a forwarded commit in flight)."""
        if halt.ended.is_set():
            return
        halt.active = False
        if self.halts.get(halt.name) is halt:
            del self.halts[halt.name]
        with trio.CancelScope(shield=True):
            async with halt.lock:
                await trio.to_thread.run_sync(halt.held.release)
        halt.ended.set()
        log.info("halt lock released %s", kv(db=halt.name, holder=halt.holder))

    async def apply_forwarded(self, halt: Halt, data: bytes | Path) -> Position:
        """Primary: apply a transaction a halt holder committed (an LTX file), as the next TXID.

        `data`: the file's bytes, or a file under `tmp_dir` (large transactions),
        which is consumed either way.

        Under the halt (writers paused) readers are locked out too while the
        pages are written, the database's own WAL is folded in first, and the
        file is kept, durably and byte for byte, as this node's LTX file, so
        replicas receive it like any other commit (the sender recognises its own
        transaction). All of it in one worker thread: a forwarded commit waits
        for this, and each trio/thread hop costs more than the work.
        """
        async with halt.lock:
            if not halt.active or self.halts.get(halt.name) is not halt or not self.writable:
                raise DatabaseError(f"the halt lock on {halt.name} is no longer held")
            name = halt.name
            db = self._require(name)
            locks = self._locks
            assert locks is not None
            path = data if isinstance(data, Path) else self.incoming_path(name)

            def apply_in_thread() -> tuple[Header, Trailer, Path, PageChecksums]:
                try:
                    with open(path, "r+b" if isinstance(data, Path) else "wb") as f:
                        if isinstance(data, bytes):
                            f.write(data)
                            f.flush()
                        os.fsync(f.fileno())
                    pages = None
                    if os.stat(path).st_size <= INLINE_VERIFY_BYTES:
                        header, trailer, pages = read_verified(path)
                    else:
                        header, trailer = verify_file(path)
                    self._check_forwarded(db, header)
                    assert db.checksums is not None
                    current = db.checksums
                    final = db.ltx_path(header.min_txid, header.max_txid)
                    wal = db.is_wal_mode()
                    started.append(final)
                    after = self._apply_locked(
                        db,
                        header,
                        trailer,
                        src=path,
                        final=final,
                        current=current,
                        pages=pages,
                        lock=lambda: locks.exclude_readers(name, wal),
                        set_aside=False,
                    )
                    return header, trailer, final, after
                finally:
                    path.unlink(missing_ok=True)

            # Set once the LTX file is about to be installed and the pages written.
            started: list[Path] = []
            try:
                header, trailer, final, after = await trio.to_thread.run_sync(apply_in_thread)
            except (OSError, LitefspyError) as exc:
                if started:
                    self._offline_after_failed_apply(halt, started[0], exc)
                raise
            pos = Position(header.max_txid, trailer.post_apply_checksum)
            db.applied(pos, after if header.commit else None)
            halt.renew()
            if header.commit and db.is_wal_mode() and not halt.wal:
                # The transaction switched the database to WAL mode: its writers
                # now take the -shm write lock, which the halt must hold too.
                await trio.to_thread.run_sync(locks.writers, name, True, 10.0, halt.held)
                halt.wal = True
        log.info(
            "applied forwarded transaction %s",
            kv(db=name, txid=f"{pos.txid:016x}", holder=halt.holder),
        )
        self._notify(CommitInfo(name, pos.txid, final, final.stat().st_size, header.timestamp))
        return pos

    def _offline_after_failed_apply(self, halt: Halt, ltx: Path, exc: BaseException) -> None:
        """A forwarded transaction failed part-way (e.g. a full disk while the file grew).

        The database file may hold some of its pages while the position does not
        include it: nothing may read or write the database until startup
        recovery re-applies the LTX file (durable before any page was written).
        """
        message = (
            f"database {halt.name} is offline: applying a forwarded transaction failed "
            f"part-way ({exc}); free the cause and restart litefspy, whose recovery "
            f"re-applies {ltx.name}"
        )
        log.error("%s", message)
        self.failed[halt.name] = message
        db = self._dbs.pop(halt.name, None)
        if db is not None:
            db.close()
        halt.active = False

    @staticmethod
    def _check_forwarded(db: Database, header: Header) -> None:
        if header.is_snapshot or not _continues(db, header):
            raise DatabaseError(
                f"forwarded transaction {header.min_txid:016x}-{header.max_txid:016x} "
                f"does not continue {db.name} at {db.pos} on the primary"
            )
        if db.checksums is None or db.checksums.page_size != header.page_size:
            raise DatabaseError(f"forwarded transaction changes the page size of {db.name}")

    def begin_forwarding(self, name: str, forward: Forwarder) -> None:
        """Replica: accept writes to `name`, each commit applied by the primary first."""
        db = self._require(name)
        db.forward = forward
        db.writable = True

    async def end_forwarding(self, name: str) -> None:
        """Replica: writes to `name` are refused again; only committed state stays."""
        db = self._dbs.get(name)
        if db is None or db.forward is None:
            return
        with trio.CancelScope(shield=True):
            # A forwarded commit in flight finishes (or fails) first.
            async with self.capture_lock(name):
                db.forward = None
                db.writable = self.writable
                if not self.writable:
                    await self._settle_database(db, "write forwarding", verify=False)

    # ------------------------------------------------------- import / export

    async def import_database(
        self, name: str, src: Path, progress: Progress | None = None
    ) -> Position:
        """Primary: replace (or create) database `name` with the SQLite file `src`.

        The file is validated first (header, `PRAGMA integrity_check`); then, with
        every SQLite reader and writer of `name` locked out through the mount, the
        import is recorded as one new TXID (replicas receive it like any other) and
        the kernel's and SQLite's caches are invalidated so open connections see
        the new content.
        """
        if not self.writable:
            raise ReadOnlyError(f"cannot import {name}: this node is a replica")
        if progress is not None:
            progress.set_detail("integrity check")
        page_size, commit = await trio.to_thread.run_sync(validate_sqlite_file, src)
        db = self.get(name) or self.create(name)
        wal = db.is_wal_mode()
        # A new database has no SQLite user to lock out (and the mount may be
        # holding lookups of its name until the import is done).
        if progress is not None:
            progress.set_detail("waiting for SQLite locks")
        held = (
            await self._lock(name, wal, exclusive=True, writers=True)
            if db.exists()
            else HeldLocks()
        )
        try:
            ltx = await trio.to_thread.run_sync(
                transfer.import_file, db, src, page_size, commit, progress
            )
            await trio.to_thread.run_sync(self._after_apply, name, wal)
        finally:
            await trio.to_thread.run_sync(held.release)
        log.info("imported database %s", kv(db=name, src=src, pos=db.pos))
        self._notify(db.commit_info(ltx))
        return db.pos

    async def export_database(
        self, name: str, out: Path, progress: Progress | None = None
    ) -> Position:
        """Write a consistent copy of `name` (its committed state) to `out`."""
        db = self._require(name)
        snap = await self.snapshot(name, progress)
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

    # ------------------------------------------------------------ retention

    def enforce_retention(self, retention: float, now: float | None = None) -> int:
        """Delete LTX files older than `retention` seconds (the newest always stays,
        and so does every file a configured backup has not uploaded yet)."""
        cutoff = (time.time() if now is None else now) - retention
        removed = 0
        for db in self.databases():
            files = db.ltx_files()
            keep_from = self.keep_from.get(db.name)
            for _, max_txid, path in files[:-1]:
                if keep_from is not None and max_txid > keep_from:
                    break  # not uploaded to the backup yet
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def deleted_past_retention(self, retention: float, now: float | None = None) -> list[str]:
        """Deleted databases whose deletion is older than `retention` seconds.

        Deleted: no database file, and the newest LTX file records the deletion
        (replicas behind still receive it from there). Once that file is the only
        one left (older ones are gone by retention, so a configured backup has
        them) and is itself past retention, nothing needs the directory any more.
        """
        cutoff = (time.time() if now is None else now) - retention
        names = []
        for db in self.databases():
            if db.checksums is not None or db.pos.txid == 0 or db.exists():
                continue
            files = db.ltx_files()
            if len(files) != 1 or files[0][1] != db.pos.txid:
                continue
            keep_from = self.keep_from.get(db.name)
            if keep_from is not None and keep_from < db.pos.txid:
                continue  # the backup has not recorded the deletion yet
            try:
                if files[0][2].stat().st_mtime < cutoff:
                    names.append(db.name)
            except FileNotFoundError:
                continue
        return names

    def forget_deleted(self, name: str) -> Path | None:
        """Take a deleted database out of the store (and every listing).

        Its directory is renamed under tmp/ (removed by the caller, or at the
        next start), so a database created with the same name meanwhile starts
        afresh. None if it is not (or no longer) a deleted database.
        """
        db = self._dbs.get(name)
        if db is None or db.checksums is not None or db.exists() or db.forward is not None:
            return None
        del self._dbs[name]
        db.close()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        grave = self.tmp_dir / f"deleted.{name}.{secrets.token_hex(6)}"
        os.rename(db.dir, grave)
        fsync_dir(self.dbs_dir)
        return grave

    async def run_retention(self, retention: float, interval: float) -> None:
        """Background task: enforce retention every `interval` seconds."""
        while True:
            await trio.sleep(interval)
            removed = await trio.to_thread.run_sync(self.enforce_retention, retention)
            if removed:
                log.info("retention removed LTX files %s", kv(count=removed))
            for name in await trio.to_thread.run_sync(self.deleted_past_retention, retention):
                # On the trio thread: no create of the same name can interleave.
                grave = self.forget_deleted(name)
                if grave is not None:
                    await trio.to_thread.run_sync(shutil.rmtree, grave, True)
                    log.info("deleted database forgotten after retention %s", kv(db=name))


def _canonical(path: Path) -> Path:
    """An absolute path with the symlinks of its parents resolved, without stat()ing it.

    The path may be the mount point itself, which litefspy must never touch.
    """
    path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def _children(super_journal: Path) -> list[str]:
    try:
        return super_journal_children(super_journal.read_bytes())
    except OSError:
        return []


def _continues(db: Database, header: Header) -> bool:
    """Does the LTX file start right after the database's position?"""
    return header.min_txid == db.pos.txid + 1 and header.pre_apply_checksum == db.pos.checksum


def _check_result(db: Database, ltx: Path, after: PageChecksums, trailer: Trailer) -> None:
    if after.total != trailer.post_apply_checksum:
        raise LTXError(
            f"applying {ltx.name} to {db.name} gave checksum {after.total:016x}, "
            f"expected {trailer.post_apply_checksum:016x}"
        )
