"""Write forwarding under a halt lock (the Halt RPC service is its network side).

Primary: a halt pauses one database's SQLite writers for a replica, and applies
the transactions the replica forwards as its next TXIDs. Replica: while it holds
the halt, its commits are forwarded to the primary before they complete.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from litefspy.errors import DatabaseError, LitefspyError, NotFoundError, ReadOnlyError
from litefspy.logs import kv
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.decoder import read_verified, verify_file
from litefspy.ltx.format import Header, Trailer
from litefspy.store.apply import INLINE_VERIFY_BYTES, apply_locked, follows
from litefspy.store.database import Database
from litefspy.store.locks import Held
from litefspy.store.types import CommitInfo, Forwarder, Position

if TYPE_CHECKING:
    from litefspy.store.store import Store

log = logging.getLogger(__name__)


@dataclass
class Halt:
    """A halt lock the primary holds for a replica (write forwarding).

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


async def begin_halt(store: Store, name: str, holder: str, ttl: float, patience: float) -> Halt:
    """Primary: pause the SQLite writers of `name` on this node for a replica.

    Waits up to `patience` seconds for another halt on the database to end and
    for the writers in progress to finish. Readers are not affected.
    """
    if not store.writable:
        raise ReadOnlyError(f"cannot halt {name}: this node is not the primary")
    db = store.get(name)
    if db is None or not db.exists() or db.pos.txid == 0:
        raise NotFoundError(f"database {name} does not exist on the primary; create it there first")
    locks = store.locks
    if locks is None:
        raise DatabaseError("halt locks need the mount")
    with trio.move_on_after(patience):
        while (current := store.halts.get(name)) is not None:
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
    if not store.writable or name in store.halts:
        await trio.to_thread.run_sync(held.release)
        raise DatabaseError(f"cannot halt {name}: the node's role changed meanwhile")
    halt = Halt(secrets.token_hex(8), name, holder, ttl, held, wal)
    halt.renew()
    store.halts[name] = halt
    log.info("halt lock granted %s", kv(db=name, holder=holder, pos=db.pos))
    return halt


async def end_halt(store: Store, halt: Halt) -> None:
    """Primary: let the writers go on (waits for a forwarded commit in flight)."""
    if halt.ended.is_set():
        return
    halt.active = False
    if store.halts.get(halt.name) is halt:
        del store.halts[halt.name]
    with trio.CancelScope(shield=True):
        async with halt.lock:
            await trio.to_thread.run_sync(halt.held.release)
    halt.ended.set()
    log.info("halt lock released %s", kv(db=halt.name, holder=halt.holder))


async def apply_forwarded(store: Store, halt: Halt, data: bytes | Path) -> Position:
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
        if not halt.active or store.halts.get(halt.name) is not halt or not store.writable:
            raise DatabaseError(f"the halt lock on {halt.name} is no longer held")
        name = halt.name
        db = store.require(name)
        locks = store.locks
        assert locks is not None
        path = data if isinstance(data, Path) else store.incoming_path(name)

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
                _check_forwarded(db, header)
                assert db.checksums is not None
                current = db.checksums
                final = db.ltx_path(header.min_txid, header.max_txid)
                wal = db.is_wal_mode()
                started.append(final)
                after = apply_locked(
                    store,
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
                _offline_after_failed_apply(store, halt, started[0], exc)
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
    store.feed.publish(CommitInfo(name, pos.txid, final, final.stat().st_size, header.timestamp))
    return pos


def _offline_after_failed_apply(store: Store, halt: Halt, ltx: Path, exc: BaseException) -> None:
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
    store.take_offline(halt.name, message)
    halt.active = False


def _check_forwarded(db: Database, header: Header) -> None:
    if header.is_snapshot or not follows(db, header):
        raise DatabaseError(
            f"forwarded transaction {header.min_txid:016x}-{header.max_txid:016x} "
            f"does not continue {db.name} at {db.pos} on the primary"
        )
    if db.checksums is None or db.checksums.page_size != header.page_size:
        raise DatabaseError(f"forwarded transaction changes the page size of {db.name}")


def begin_forwarding(store: Store, name: str, forward: Forwarder) -> None:
    """Replica: accept writes to `name`, each commit applied by the primary first."""
    db = store.require(name)
    db.forward = forward
    db.writable = True


async def end_forwarding(store: Store, name: str) -> None:
    """Replica: writes to `name` are refused again; only committed state stays."""
    db = store.get_if_online(name)
    if db is None or db.forward is None:
        return
    with trio.CancelScope(shield=True):
        # A forwarded commit in flight finishes (or fails) first.
        async with store.capture_lock(name):
            db.forward = None
            db.writable = store.writable
            if not store.writable:
                await store.settle_database(db, "write forwarding", verify=False)
