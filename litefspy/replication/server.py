"""Primary side of replication: one catch-up-then-follow session per replica stream.

Per database, a session compares the replica's position with the primary's:

* equal: nothing to send;
* the LTX file that starts at the replica's TXID + 1 exists and its pre-apply
  checksum equals the replica's checksum: send the files, in order;
* anything else (no position, retention removed the file, replica ahead, same
  TXID with another checksum): send a snapshot built on the fly by the store
  (`Store.snapshot`), then continue with files.

The session then remembers what it sent as the replica's position: if the
replica fails to apply anything it drops the stream, and its next stream starts
again from its real positions.

Commits never wait for replicas: the store's listener only sets each session's
wake-up event, and every session catches up from the LTX files on disk at its
own pace. A session exactly one TXID behind gets the commit just made from the
memory it was captured in (`CommitInfo.captured`), not from its file.

Ending: `shutdown(reason, drain=True)` (demotion, graceful stop) first sends
each replica everything up to the final positions (writes have stopped), then
End; sessions still open after the grace period are cancelled. A handoff
(`send_handoff`) puts a Handoff frame into the target's stream after every LTX
file up to the final positions.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import trio

from litefspy.errors import DatabaseError, LTXError, NotFoundError
from litefspy.logs import kv
from litefspy.progress import SNAPSHOT_SEND, Progress
from litefspy.replication.ltxfile import CHUNK_SIZE, OpenLTX, open_bytes, open_ltx
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.methods import Frame
from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import Captured, CommitInfo, Position
from litefspy.v1 import replication_pb2 as pb

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
# A replica without a position for a database gets its files from TXID 1 if
# the primary still has them all and there are at most this many; a snapshot
# otherwise. (A database created while the replica is connected thus arrives
# as its first file, not as a snapshot.)
MAX_FILES_FROM_START = 16
RETRY_INTERVAL = 1.0
# LTX files up to this size are opened on the trio thread when just written,
# and a commit captured here up to this size is kept in memory to send.
INLINE_OPEN_BYTES = 256 * 1024


@dataclass(frozen=True)
class PrimaryIdentity:
    """How the primary introduces itself in Hello."""

    node_id: int
    hostname: str
    advertise_url: str


@dataclass
class SendTotals:
    """What this node sent to replicas since it started, over every session and
    every term as primary (metrics counters must never go back)."""

    files: int = 0
    snapshots: int = 0
    bytes: int = 0
    # Snapshots that could not be built, and streams that ended in an error.
    errors: int = 0


@dataclass
class ReplicaSession:
    """One connected replica, as the primary sees it (shown by `litefspy status`)."""

    node_id: int
    hostname: str
    advertise_url: str
    peer: str
    connected_at_ms: int
    # What the primary has sent: the replica's position once it has applied it.
    positions: dict[str, Position] = field(default_factory=dict)
    files_sent: int = 0
    snapshots_sent: int = 0
    bytes_sent: int = 0
    ready: bool = False
    wake: trio.Event = field(default_factory=trio.Event)
    # Databases committed to since the last pass: a wake-up looks at these only.
    # `full_pass` makes the next pass look at every database (the first one, a
    # retry, a poll from wait_caught_up).
    changed: set[str] = field(default_factory=set)
    full_pass: bool = True
    # Deleted databases this replica cannot follow (it diverged before the delete).
    skipped: set[str] = field(default_factory=set)
    # Databases the replica holds offline (failed recovery): left alone.
    offline: set[str] = field(default_factory=set)
    # Databases whose snapshot failed: retried every RETRY_INTERVAL.
    failing: set[str] = field(default_factory=set)
    # Set (and replaced) after every file sent: `wait_caught_up` watches it.
    progress: trio.Event = field(default_factory=trio.Event)
    # A Handoff frame to send after the next complete pass (see send_handoff).
    handoff: pb.Handoff | None = None
    handoff_sent: trio.Event = field(default_factory=trio.Event)
    # Cancels this session's stream (shutdown after the grace period).
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class ReplicationServer:
    """Serves `Replication.Stream` on the primary (the bridge's StreamHandler)."""

    def __init__(
        self,
        store: Store,
        identity: PrimaryIdentity,
        *,
        cluster_id: str,
        epoch: int,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        chunk_size: int = CHUNK_SIZE,
        totals: SendTotals | None = None,
    ) -> None:
        self.store = store
        self.totals = totals if totals is not None else SendTotals()
        self.identity = identity
        self.cluster_id = cluster_id
        self.epoch = epoch
        self.heartbeat_interval = heartbeat_interval
        self.chunk_size = chunk_size
        self.sessions: list[ReplicaSession] = []
        self._ending: str | None = None
        # With `_ending`: send everything up to the final positions before End.
        self._drain = False
        self._no_sessions = trio.Event()
        # Per database, the newest commit captured on this node (small ones,
        # while replicas are connected): sent from memory to a session one TXID behind.
        self._captured: dict[str, Captured] = {}
        self._unsubscribe = store.feed.subscribe(self._on_commit)

    def close(self) -> None:
        """Stop listening to commits."""
        self._unsubscribe()

    def _on_commit(self, info: CommitInfo) -> None:
        # Runs inside the FUSE handler that committed: only wake the sessions.
        captured = info.captured
        if captured is not None and self.sessions and len(captured.ltx) <= INLINE_OPEN_BYTES:
            self._captured[info.name] = captured
        else:
            self._captured.pop(info.name, None)
        for session in self.sessions:
            session.changed.add(info.name)
            session.wake.set()

    async def shutdown(self, reason: str, grace: float = 2.0, *, drain: bool = False) -> None:
        """Tell every replica the stream ends (End frame); wait up to `grace` seconds.

        With `drain` (writes have stopped), each replica first gets every file up
        to the final positions. Sessions still open after `grace` are cancelled.
        """
        self._ending = reason
        self._drain = drain
        for session in self.sessions:
            session.wake.set()
        with trio.move_on_after(grace):
            if self.sessions:
                await self._no_sessions.wait()
        for session in list(self.sessions):
            log.warning(
                "replica did not finish its stream in time, closing it %s",
                kv(replica=session.hostname, grace=grace),
            )
            session.scope.cancel()

    def session_for(self, node_id: int) -> ReplicaSession | None:
        """The open session of the replica with this node id, if any."""
        return next((s for s in self.sessions if s.node_id == node_id), None)

    def is_caught_up(self, session: ReplicaSession) -> bool:
        """Whether `session` was sent every database up to the primary's position."""
        for db in self.store.databases():
            if db.name in session.offline or db.name in session.skipped or db.pos.txid == 0:
                continue
            have = session.positions.get(db.name)
            if have != db.pos and not (have is None and not db.exists()):
                return False
        return True

    async def wait_caught_up(self, session: ReplicaSession) -> bool:
        """Wait until `is_caught_up(session)`; False if the session ends first."""
        while session in self.sessions:
            progress = session.progress
            if self.is_caught_up(session):
                return True
            session.full_pass = True
            session.wake.set()
            # Polled as well: a snapshot that failed is retried without progress.
            with trio.move_on_after(0.05):
                await progress.wait()
        return False

    def send_handoff(self, session: ReplicaSession, handoff: pb.Handoff) -> None:
        """Queue a Handoff frame for `session`, sent after its next complete pass."""
        session.handoff = handoff
        session.wake.set()

    # ------------------------------------------------------------- streams

    async def stream(
        self, request: pb.StreamRequest, peer: str, send: trio.MemorySendChannel[Frame]
    ) -> None:
        """Serve one replica until it goes away or the primary shuts down."""
        self._check_request(request, peer)
        session = ReplicaSession(
            node_id=request.node_id,
            hostname=request.hostname,
            advertise_url=request.advertise_url,
            peer=peer,
            connected_at_ms=int(time.time() * 1000),
            positions={
                p.name: Position(p.txid, p.checksum) for p in request.positions if p.txid > 0
            },
            offline=set(request.offline),
        )
        ctx = kv(replica=f"{request.node_id:016X}", hostname=request.hostname, peer=peer)
        log.info("replica connected %s", ctx)
        self.sessions.append(session)
        try:
            with session.scope:
                await send.send(
                    Frame(
                        hello=pb.Hello(
                            node_id=self.identity.node_id,
                            hostname=self.identity.hostname,
                            advertise_url=self.identity.advertise_url,
                            cluster_id=self.cluster_id,
                            epoch=self.epoch,
                        )
                    )
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeats, send)
                    await self._follow(session, send)
                    nursery.cancel_scope.cancel()
        except Exception:
            self.totals.errors += 1
            raise
        finally:
            self.sessions.remove(session)
            if not self.sessions:
                self._captured.clear()
                self._no_sessions.set()
                self._no_sessions = trio.Event()
            log.info(
                "replica disconnected %s",
                kv(**ctx.fields, files=session.files_sent, snapshots=session.snapshots_sent),
            )

    def _check_request(self, request: pb.StreamRequest, peer: str) -> None:
        if request.node_id == self.identity.node_id:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"node {self.identity.hostname} ({request.node_id:016X}) refuses to replicate "
                "from itself: the replica's lease.advertise-url points at this node",
            )
        if request.cluster_id and request.cluster_id != self.cluster_id:
            log.error(
                "replica from another cluster refused %s",
                kv(peer=peer, replica_cluster=request.cluster_id, cluster=self.cluster_id),
            )
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cluster id mismatch: replica {request.hostname} belongs to cluster "
                f"{request.cluster_id}, primary {self.identity.hostname} to {self.cluster_id}; "
                "a node joins one cluster only (move its data.dir aside to join this one)",
            )
        if self._ending is not None:
            raise RPCRefused(Code.UNAVAILABLE, f"primary is {self._ending}")

    async def _heartbeats(self, send: trio.MemorySendChannel[Frame]) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            await send.send(Frame(heartbeat=pb.Heartbeat(unix_ms=int(time.time() * 1000))))

    async def _follow(self, session: ReplicaSession, send: trio.MemorySendChannel[Frame]) -> None:
        while True:
            # A fresh event before looking: a commit from now on wakes the next wait.
            session.wake = trio.Event()
            ending = self._ending
            if ending is not None and not self._drain:
                await send.send(Frame(end=pb.End(reason=ending)))
                return
            for db in self._to_look_at(session, ending is not None):
                await self._sync_database(session, db, send)
                if self._stopping:
                    break
            if session.handoff is not None and not session.handoff_sent.is_set():
                await send.send(Frame(handoff=session.handoff))
                session.handoff_sent.set()
            if ending is not None:
                # A whole pass since writes stopped: the replica has the final state.
                await send.send(Frame(end=pb.End(reason=ending)))
                return
            if not session.ready and self._ending is None:
                session.ready = True
                await send.send(Frame(ready=pb.Ready()))
                log.info(
                    "replica caught up %s",
                    kv(replica=session.hostname, databases=len(session.positions)),
                )
            with trio.move_on_after(RETRY_INTERVAL if session.failing else math.inf):
                await session.wake.wait()
            if session.failing:
                session.full_pass = True

    def _to_look_at(self, session: ReplicaSession, ending: bool) -> list[Database]:
        """The databases one pass of `_follow` looks at: those committed to since the
        last pass (a commit names its database), or all of them for a full pass."""
        if session.full_pass or ending:
            session.full_pass = False
            session.changed.clear()
            return self.store.databases()
        names, session.changed = session.changed, set()
        found = (self.store.get_if_online(name) for name in sorted(names))
        return [db for db in found if db is not None]

    @property
    def _stopping(self) -> bool:
        """Ending without draining: stop sending files."""
        return self._ending is not None and not self._drain

    # --------------------------------------------------------- per database

    async def _sync_database(
        self, session: ReplicaSession, db: Database, send: trio.MemorySendChannel[Frame]
    ) -> None:
        name = db.name
        if name in session.offline:
            return
        while not self._stopping:
            target = db.pos
            have = session.positions.get(name)
            if target.txid == 0 or have == target:
                return
            if not db.exists() and have is None:
                return  # deleted before this replica ever had it
            opened, diverged = await self._next_file(session, db, have, target)
            if opened is not None:
                await self._send_open(session, name, opened, send, snapshot=False)
                continue
            if not db.exists():
                if name not in session.skipped:
                    session.skipped.add(name)
                    log.warning(
                        "database was deleted on the primary but the replica's history "
                        "diverged before that; leaving its copy alone %s",
                        kv(db=name, replica=session.hostname, replica_pos=have),
                    )
                return
            if not await self._send_snapshot(session, db, send, diverged=diverged):
                return

    async def _next_file(
        self, session: ReplicaSession, db: Database, have: Position | None, target: Position
    ) -> tuple[OpenLTX | None, bool]:
        """(the file that continues the replica's position, opened, or None; whether the
        replica's history is known to differ from the primary's)."""
        if have is None:
            if target.txid > MAX_FILES_FROM_START:
                return None, False
            have = Position(0, 0)
        if have.txid >= target.txid:
            return None, True  # ahead, or the same TXID with another checksum
        captured = self._captured.get(db.name)
        if (
            captured is not None
            and captured.header.min_txid == have.txid + 1
            and Position(captured.header.max_txid, captured.post_apply_checksum) == target
            and captured.header.pre_apply_checksum == have.checksum
        ):
            # The commit just made, from the memory it was captured in.
            return open_bytes(captured.ltx, self.chunk_size), False
        if target.txid == have.txid + 1 and db.last_commit_size <= INLINE_OPEN_BYTES:
            # The commit just made, still in the page cache: opening it here costs
            # less than the trip to a worker thread and back (replication lag).
            opened = _open_continuation(db, have.txid + 1, self.chunk_size)
        else:
            opened = await trio.to_thread.run_sync(
                _open_continuation, db, have.txid + 1, self.chunk_size
            )
        if opened is None:
            return None, False  # retention removed it: nothing says the history differs
        header = opened.header
        if header.pre_apply_checksum != have.checksum:
            opened.close()
            return None, True
        return opened, False

    async def _send_snapshot(
        self,
        session: ReplicaSession,
        db: Database,
        send: trio.MemorySendChannel[Frame],
        *,
        diverged: bool,
    ) -> bool:
        """Build a snapshot of `db` and send it; False if it could not be built."""
        name = db.name
        log.info(
            "sending snapshot %s",
            kv(
                db=name,
                replica=session.hostname,
                replica_pos=session.positions.get(name),
                primary_pos=db.pos,
                reason="replica history differs" if diverged else "no usable position",
            ),
        )
        board = self.store.progress
        with board.track(SNAPSHOT_SEND, name, 0, detail=f"to {session.hostname}") as progress:
            try:
                path = await self.store.snapshot(name, progress)
            except (NotFoundError, DatabaseError) as exc:
                # Deleted or changed under us, or offline: look again in a while.
                level = logging.DEBUG if name in session.failing else logging.WARNING
                log.log(level, "snapshot failed, will retry %s: %s", kv(db=name), exc)
                if name not in session.failing:
                    self.totals.errors += 1
                session.failing.add(name)
                return False
            session.failing.discard(name)
            try:
                opened = await trio.to_thread.run_sync(open_ltx, path, self.chunk_size)
            finally:
                path.unlink(missing_ok=True)
            progress.next_phase(f"sending to {session.hostname}", opened.size)
            await self._send_open(
                session, name, opened, send, snapshot=True, diverged=diverged, progress=progress
            )
        return True

    async def _send_open(
        self,
        session: ReplicaSession,
        name: str,
        opened: OpenLTX,
        send: trio.MemorySendChannel[Frame],
        *,
        snapshot: bool,
        diverged: bool = False,
        progress: Progress | None = None,
    ) -> None:
        """Send one opened LTX file as chunks, then record the replica's new position."""
        try:
            data = opened.head
            offset = len(data)
            first = True
            while True:
                last = offset >= opened.size
                chunk = pb.LTXChunk(
                    name=name,
                    data=data,
                    first=first,
                    last=last,
                    size=opened.size if first else 0,
                    snapshot=snapshot and first,
                    diverged=diverged and first,
                )
                await send.send(Frame(ltx=chunk))
                if progress is not None:
                    progress.advance(len(data))
                if last:
                    break
                first = False
                data = await trio.to_thread.run_sync(opened.file.read, self.chunk_size)
                if not data:
                    raise LTXError(f"LTX file for {name} shrank while being sent")
                offset += len(data)
        finally:
            opened.close()
        header, trailer = opened.header, opened.trailer
        session.positions[name] = Position(header.max_txid, trailer.post_apply_checksum)
        session.files_sent += 1
        session.bytes_sent += opened.size
        self.totals.files += 1
        self.totals.bytes += opened.size
        session.progress.set()
        session.progress = trio.Event()
        if snapshot:
            session.snapshots_sent += 1
            self.totals.snapshots += 1
        log.debug(
            "sent %s",
            kv(
                db=name,
                replica=session.hostname,
                txid=f"{header.min_txid:016x}-{header.max_txid:016x}",
                bytes=opened.size,
                snapshot=snapshot,
            ),
        )


def _open_continuation(db: Database, txid: int, chunk_size: int) -> OpenLTX | None:
    """Open the LTX file of `db` whose range starts at `txid` (worker thread).

    None when there is none (retention removed it) or it cannot be read: the
    caller then sends a snapshot, which is always possible.
    """
    path = db.ltx_path(txid, txid)
    if not path.exists():
        # Files covering several TXIDs (compaction) are found by listing.
        path = next((p for lo, _hi, p in db.ltx_files() if lo == txid), path)
    try:
        return open_ltx(path, chunk_size)
    except FileNotFoundError:
        return None
    except (OSError, LTXError) as exc:
        log.error("cannot read LTX file, sending a snapshot instead %s: %s", kv(db=db.name), exc)
        return None
