"""All databases of one node: the registry (open, get, create), role, retention, mount.

The jobs on a database live beside it: `apply` (replica apply), `halt` (write
forwarding), `transfer` (import, export, snapshots), `recovery`, `capture`.
`Store` keeps their entry points callable where callers are many.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from litefspy.errors import (
    DatabaseError,
    NotFoundError,
    RecoveryError,
)
from litefspy.fsutil import fsync_dir, sync_files
from litefspy.logs import kv
from litefspy.progress import Progress, ProgressBoard
from litefspy.sqlite.journal import (
    JOURNAL_HEADER_SIZE,
    parse_journal_header,
    read_super_journal_name,
    super_journal_children,
)
from litefspy.store import apply, recovery, transfer
from litefspy.store import halt as halts
from litefspy.store.database import Database
from litefspy.store.feed import CommitFeed
from litefspy.store.files import (
    is_super_journal_name,
    load_node_id,
    valid_database_name,
)
from litefspy.store.halt import Halt
from litefspy.store.keeper import LockKeeper
from litefspy.store.locks import Held, HeldLocks
from litefspy.store.owner import lock_data_dir
from litefspy.store.types import FileKind, Forwarder, Position

T = TypeVar("T")
log = logging.getLogger(__name__)


class CacheInvalidator(Protocol):
    """The FUSE layer's hook to drop the kernel's caches of one database."""

    def invalidate_database(self, name: str, *, entries: bool = True) -> None:
        """Invalidate cached pages, attributes and (with `entries`) entries of every
        file of `name`. Without: no name of the database was created or removed."""


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
        # Every new LTX file is announced here (commits, applies, imports).
        self.feed = CommitFeed()
        self.writable = True
        self.tmp_dir = self.data_dir / "tmp"
        self.locks: LockKeeper | None = None
        self.invalidator: CacheInvalidator | None = None
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
            db.on_commit = self.feed.publish
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
            on_commit=self.feed.publish,
            super_journal_exists=self.super_journal_exists,
        )
        db.writable = self.writable
        db.progress = self.progress
        return db

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
        self.locks = LockKeeper(Path(mountpoint))
        self.locks.start()
        self.invalidator = invalidator

    @property
    def lock_keeper_pid(self) -> int | None:
        """The process that takes litefspy's locks through the mount (if any)."""
        return self.locks.pid if self.locks is not None else None

    def detach_mount(self) -> None:
        """Let go of every lock and descriptor on the mount (before unmounting)."""
        locks, self.locks = self.locks, None
        if locks is not None:
            locks.close()

    def incoming_path(self, name: str) -> Path:
        """A fresh temp path, on the data filesystem, to receive an LTX file into."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{name}.{secrets.token_hex(6)}.ltx.tmp"

    def require(self, name: str) -> Database:
        db = self.get(name)
        if db is None:
            raise NotFoundError(f"no database named {name}")
        return db

    async def take_locks(
        self, name: str, wal: bool, *, exclusive: bool, writers: bool = False
    ) -> Held:
        locks = self.locks
        if locks is None:
            return HeldLocks()
        if exclusive:
            return await trio.to_thread.run_sync(locks.exclusive, name, wal, writers)
        return await trio.to_thread.run_sync(locks.read, name, wal)

    async def apply_ltx(
        self, name: str, source: Path | bytes, *, set_aside: bool = False
    ) -> Position:
        """Replica side: apply one complete received LTX file, or its bytes (see apply.py)."""
        return await apply.apply_ltx(self, name, source, set_aside=set_aside)

    def after_apply(self, name: str, wal: bool, held: Held | None = None) -> None:
        """Worker thread, locks held: make readers see the new pages."""
        apply.after_apply(self, name, wal, held)

    async def begin_halt(self, name: str, holder: str, ttl: float, patience: float) -> Halt:
        """Primary: pause the SQLite writers of `name` on this node for a replica."""
        return await halts.begin_halt(self, name, holder, ttl, patience)

    async def end_halt(self, halt: Halt) -> None:
        """Primary: let the writers go on (waits for a forwarded commit in flight)."""
        await halts.end_halt(self, halt)

    async def apply_forwarded(self, halt: Halt, data: bytes | Path) -> Position:
        """Primary: apply a transaction a halt holder committed (an LTX file), as the next TXID."""
        return await halts.apply_forwarded(self, halt, data)

    def begin_forwarding(self, name: str, forward: Forwarder) -> None:
        """Replica: accept writes to `name`, each commit applied by the primary first."""
        halts.begin_forwarding(self, name, forward)

    async def end_forwarding(self, name: str) -> None:
        """Replica: writes to `name` are refused again; only committed state stays."""
        await halts.end_forwarding(self, name)

    async def snapshot(self, name: str, progress: Progress | None = None) -> Path:
        """A verified LTX snapshot of the committed state; the caller deletes the file."""
        return await transfer.snapshot(self, name, progress)

    async def import_database(
        self, name: str, src: Path, progress: Progress | None = None
    ) -> Position:
        """Primary: replace (or create) database `name` with the SQLite file `src`."""
        return await transfer.import_database(self, name, src, progress)

    async def export_database(
        self, name: str, out: Path, progress: Progress | None = None
    ) -> Position:
        """Write a consistent copy of `name` (its committed state) to `out`."""
        return await transfer.export_database(self, name, out, progress)

    def take_offline(self, name: str, message: str) -> Database | None:
        """Mark `name` offline with `message` (until a restart's recovery); its Database."""
        self.failed[name] = message
        db = self._dbs.pop(name, None)
        if db is not None:
            db.close()
        return db

    # ------------------------------------------------------------ roles

    async def demote(self) -> None:
        """Primary -> replica: refuse writes at once, then leave only committed state.

        Connections mid-transaction may still roll back (see capture); once no
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
            await self.settle_database(db, "demotion")

    async def settle_database(self, db: Database, why: str, *, verify: bool = True) -> None:
        """Lock every SQLite connection out and leave only committed state (recovery.settle).

        A database that cannot be settled gets position 0, so the primary
        re-snapshots it.
        """
        wal = db.is_wal_mode()
        try:
            held = await self.take_locks(db.name, wal, exclusive=True, writers=True)
        except DatabaseError as exc:
            log.error("could not lock database to settle it %s: %s", kv(db=db.name, after=why), exc)
            return
        try:
            done = await trio.to_thread.run_sync(partial(recovery.settle, db, verify=verify))
            # Here, on the trio thread that uses them (never from the worker: a
            # descriptor closed there could be one a FUSE handler is using, or
            # its number already reused); the next capture reopens them.
            db.close()
            await trio.to_thread.run_sync(self.after_apply, db.name, wal)
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
