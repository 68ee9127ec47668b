"""`Data.Events`: a live feed of what happens to a node's databases (LiteFS `/events`).

A client first gets one `init` per database (its position, whether this node is
the primary, the primary's hostname), then a `tx` for every new LTX file
(commits on the primary, applied files on a replica, imports), a
`primaryChange` whenever this node's role or the primary's hostname changes,
and, on a primary with `backup.url`, a `backup` for every object that reached
the store (TXID, level, bytes, commit and upload times: the recovery point)
and every new upload error (one line, with the TXID the store has).
`event_to_json` gives the LiteFS JSON form that `litefspy events` prints, one
object per line.

The store's commit listeners run inside FUSE handlers, so the hub's listener
only builds the event from in-memory state and hands it to the trio loop; each
subscriber has a bounded queue and a client too slow to drain it is dropped
(it reconnects and gets a fresh `init`), so a stuck client never holds memory
or slows commits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from litefspy.cluster.view import NodeView
from litefspy.errors import LitefspyError, NotFoundError
from litefspy.logs import kv
from litefspy.ltx.peek import read_ends
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.server import GRPCServer
from litefspy.store.types import CommitInfo
from litefspy.v1 import data_pb2 as pb

if TYPE_CHECKING:
    from litefspy.backup.uploader import BackupProgress

log = logging.getLogger(__name__)

_DATA = pb.DESCRIPTOR.services_by_name["Data"].full_name
EVENTS_METHOD = f"/{_DATA}/Events"
# Events queued for one client before it counts as stuck and is dropped.
SUBSCRIBER_BUFFER = 1024
# The primary's hostname can change without this node's role changing (a replica
# following a failover), so subscribers also look at it this often.
PRIMARY_POLL_INTERVAL = 0.25

# A queued item: a ready TxEvent, a CommitInfo whose details must be read from
# its LTX file, a BackupEvent, or None ("look at the primary again").
_Item = tuple[int, pb.TxEvent | CommitInfo | pb.BackupEvent | None]


@dataclass(eq=False)
class _Subscriber:
    send: trio.MemorySendChannel[_Item]
    receive: trio.MemoryReceiveChannel[_Item]
    # Sequence number of the last commit already reflected in this client's init.
    after: int
    overflowed: bool = field(default=False)


class EventHub:
    """Fans store commits and role changes out to the open `Events` streams."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self._subscribers: set[_Subscriber] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._seq = 0

    def register(self, server: GRPCServer) -> None:
        """Listen to the node and serve `Data.Events` on `server`."""
        self.node.store.feed.subscribe(self._on_commit)
        self.node.on_role_change(self._on_role_change)
        self.node.on_backup_event(self._on_backup)
        server.add_server_stream(EVENTS_METHOD, self.stream)

    # ------------------------------------------------------- node side

    def _on_commit(self, info: CommitInfo) -> None:
        if not self._subscribers:
            return
        self._seq += 1
        self._post((self._seq, tx_event(self.node, info)))

    def _on_backup(self, progress: BackupProgress) -> None:
        if self._subscribers:
            self._post((self._seq, backup_event(progress)))

    def _on_role_change(self, role: str) -> None:
        del role  # subscribers compare the node's current state with what they last sent
        if self._subscribers:
            self._post((self._seq, None))

    def _post(self, item: _Item) -> None:
        # Listeners may run on any thread; the subscriber set is only touched in trio.
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._dispatch, item)
        except trio.RunFinishedError:
            pass

    def _dispatch(self, item: _Item) -> None:
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(item)
            except trio.WouldBlock:
                sub.overflowed = True
                sub.send.close()
                self._subscribers.discard(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(sub)

    @contextmanager
    def subscribe(self) -> Iterator[_Subscriber]:
        """A queue of events from now on (trio thread; take the init snapshot right after)."""
        self._token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[_Item](SUBSCRIBER_BUFFER)
        sub = _Subscriber(send, receive, after=self._seq)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            send.close()
            receive.close()

    # ----------------------------------------------------- client side

    def _primary(self) -> pb.PrimaryChangeEvent:
        return pb.PrimaryChangeEvent(
            is_primary=self.node.is_primary(), hostname=self.node.primary_hostname() or ""
        )

    def init_events(self, primary: pb.PrimaryChangeEvent) -> list[pb.Event]:
        """One `init` per database (or one without a database when there is none)."""
        events = [
            pb.Event(
                init=pb.InitEvent(
                    is_primary=primary.is_primary,
                    hostname=primary.hostname,
                    db=db.name,
                    txid=db.pos.txid,
                    post_apply_checksum=db.pos.checksum,
                )
            )
            for db in self.node.store.databases()
        ]
        if not events:
            init = pb.InitEvent(is_primary=primary.is_primary, hostname=primary.hostname)
            events.append(pb.Event(init=init))
        return events

    async def stream(
        self, request: pb.EventsRequest, peer: str, send: trio.MemorySendChannel[pb.Event]
    ) -> None:
        """The `Data.Events` handler: init, then events until the client goes away."""
        del request
        log.debug("events subscriber connected %s", kv(peer=peer))
        with self.subscribe() as sub:
            # No checkpoint between subscribing and this snapshot: every commit is
            # either in the init positions or queued with a sequence number > after.
            primary = self._primary()
            for event in self.init_events(primary):
                await send.send(event)
            while True:
                item: _Item | None = None
                with trio.move_on_after(PRIMARY_POLL_INTERVAL):
                    try:
                        item = await sub.receive.receive()
                    except trio.EndOfChannel:
                        raise RPCRefused(
                            Code.UNAVAILABLE,
                            f"event stream fell more than {SUBSCRIBER_BUFFER} events behind "
                            "and was dropped; reconnect",
                        ) from None
                now = self._primary()
                if now != primary:
                    primary = now
                    await send.send(pb.Event(primary_change=now))
                if item is None:
                    continue
                seq, payload = item
                if isinstance(payload, pb.BackupEvent):
                    # Not part of the init snapshot: every one queued is news.
                    await send.send(pb.Event(backup=payload))
                    continue
                if payload is None or seq <= sub.after:
                    continue
                if isinstance(payload, CommitInfo):
                    payload = await trio.to_thread.run_sync(tx_event_from_file, payload)
                await send.send(pb.Event(tx=payload))


def tx_event(node: NodeView, info: CommitInfo) -> pb.TxEvent | CommitInfo:
    """The event for a new LTX file from the database's in-memory state (cheap).

    The store advances the position before it notifies; should it ever not
    match, the CommitInfo is returned and its file read later, off the loop.
    """
    try:
        db = node.store.get(info.name)
    except NotFoundError:
        db = None
    if db is None or db.pos.txid != info.txid:
        return info
    checksums = db.checksums
    return pb.TxEvent(
        db=info.name,
        txid=info.txid,
        post_apply_checksum=db.pos.checksum,
        page_size=checksums.page_size if checksums is not None else 0,
        commit=checksums.page_count if checksums is not None else 0,
        timestamp_ms=info.timestamp_ms,
    )


def backup_event(progress: BackupProgress) -> pb.BackupEvent:
    return pb.BackupEvent(
        db=progress.db,
        txid=progress.txid,
        post_apply_checksum=progress.checksum,
        level=progress.level,
        key=progress.key,
        bytes=progress.bytes,
        committed_ms=progress.committed_ms,
        uploaded_ms=progress.uploaded_ms,
        deleted=progress.deleted,
        error=progress.error,
        lag_txids=progress.lag_txids,
    )


def tx_event_from_file(info: CommitInfo) -> pb.TxEvent:
    """The event for a new LTX file from its header and trailer (worker thread)."""
    try:
        header, trailer = read_ends(info.path)
    except (OSError, LitefspyError) as exc:
        log.warning("cannot read LTX file for an event %s", kv(db=info.name, error=exc))
        return pb.TxEvent(db=info.name, txid=info.txid, timestamp_ms=info.timestamp_ms)
    return pb.TxEvent(
        db=info.name,
        txid=header.max_txid,
        post_apply_checksum=trailer.post_apply_checksum,
        page_size=header.page_size,
        commit=header.commit,
        timestamp_ms=header.timestamp,
    )


# ------------------------------------------------------------------ JSON form


def _hex(value: int) -> str:
    return f"{value:016x}"


def _timestamp(ms: int) -> str:
    when = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def event_to_json(event: pb.Event) -> dict[str, Any]:
    """The LiteFS `/events` JSON object for an event (`{"type", "db"?, "data"}`)."""
    kind = event.WhichOneof("event")
    if kind == "init":
        init = event.init
        data: dict[str, Any] = {"isPrimary": init.is_primary, "hostname": init.hostname}
        out: dict[str, Any] = {"type": "init"}
        if init.db:
            out["db"] = init.db
            data["txID"] = _hex(init.txid)
            data["postApplyChecksum"] = _hex(init.post_apply_checksum)
        out["data"] = data
        return out
    if kind == "tx":
        tx = event.tx
        return {
            "type": "tx",
            "db": tx.db,
            "data": {
                "txID": _hex(tx.txid),
                "postApplyChecksum": _hex(tx.post_apply_checksum),
                "pageSize": tx.page_size,
                "commit": tx.commit,
                "timestamp": _timestamp(tx.timestamp_ms),
            },
        }
    if kind == "backup":
        up = event.backup
        data = {"txID": _hex(up.txid), "lagTxIDs": up.lag_txids}
        if up.error:
            data["error"] = up.error
        else:
            data |= {
                "level": up.level,
                "key": up.key,
                "bytes": up.bytes,
                "postApplyChecksum": _hex(up.post_apply_checksum),
                "committed": _timestamp(up.committed_ms) if up.committed_ms else "",
                "uploaded": _timestamp(up.uploaded_ms),
                "rpoMs": max(up.uploaded_ms - up.committed_ms, 0) if up.committed_ms else 0,
                "deleted": up.deleted,
            }
        return {"type": "backup", "db": up.db, "data": data}
    if kind == "primary_change":
        change = event.primary_change
        return {
            "type": "primaryChange",
            "data": {"isPrimary": change.is_primary, "hostname": change.hostname},
        }
    raise LitefspyError(f"unknown event kind {kind!r} (is this litefspy older than the node?)")
