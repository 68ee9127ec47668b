"""Replica side of replication: follow the primary's stream, apply every LTX file.

One stream at a time. The replica sends its positions, receives Hello (checked:
not itself, same cluster, epoch not older than one already seen), then LTX
files in chunks, and applies each with `Store.apply_ltx` on its last chunk: a
file that came in one chunk straight from the received bytes (verified in
memory, written once into `ltx/` by the apply), a longer one from a temp file
at `Store.incoming_path` that the chunks were written to. Any error (transport, protocol, a file
that does not verify or does not continue the position) drops the stream; the
replica reconnects after `lease.reconnect-delay`, doubling up to
`MAX_BACKOFF` while the primary stays unreachable. A database whose apply
failed is requested without a position next time, so the primary sends a
snapshot rather than the same file again.

The client is also the node's `ClusterView` while it is a replica: `.primary`
names the primary while a stream is up, `.lag` is the time since the last
frame (data or heartbeat).

Fencing: the client remembers the highest lease epoch it has seen (from a
Hello, or told by the node through `note_epoch`) in `<data>/epoch`, and
refuses a primary whose Hello carries an older one, also after a restart.

The node retargets the client when the primary changes (it sets
`primary_url` and restarts `run`). A Handoff frame is passed to the node's
`on_handoff` callback: the lease is being handed to this node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import trio

from litefspy.errors import LitefspyError, ReplicationError
from litefspy.logs import kv
from litefspy.progress import SNAPSHOT_RECEIVE, Progress
from litefspy.replication.identity import (
    load_max_epoch,
    save_cluster_id,
    save_max_epoch,
    valid_cluster_id,
)
from litefspy.rpc import client as rpc_client
from litefspy.rpc.client import FrameStream
from litefspy.store.files import valid_database_name
from litefspy.store.store import Store
from litefspy.v1 import replication_pb2 as pb

log = logging.getLogger(__name__)

# No frame at all (heartbeats come every second) for this long: the primary is gone.
HEARTBEAT_TIMEOUT = 10.0
MAX_BACKOFF = 8.0

OpenStream = Callable[[str, pb.StreamRequest], AbstractAsyncContextManager[FrameStream]]


@dataclass
class ReplicaIdentity:
    """How the replica introduces itself in its StreamRequest."""

    node_id: int
    hostname: str
    advertise_url: str


@dataclass
class ClientStats:
    """Counters shown by `litefspy status` on a replica."""

    connects: int = 0
    files_applied: int = 0
    snapshots_applied: int = 0
    bytes_received: int = 0
    apply_errors: int = 0
    last_error: str = ""
    last_error_ms: int = 0  # Unix ms of last_error
    connected_ms: int = 0  # Unix ms of the last successful connect
    applied_by_db: dict[str, int] = field(default_factory=dict)

    errors: int = 0  # streams that ended in an error, and failed applies

    def record_error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        self.last_error_ms = int(time.time() * 1000)

    def error_healed(self, connected: bool) -> bool:
        """The last error happened before the stream that is up now connected."""
        return connected and bool(self.last_error) and self.last_error_ms <= self.connected_ms


class _Incoming:
    """An LTX file being received: in memory if it came in one chunk (`data`),
    else into a temp path.

    Each chunk written is one trip to a worker thread (open on the first,
    close on the last).
    """

    def __init__(self, name: str, path: Path, size: int, *, snapshot: bool, diverged: bool) -> None:
        self.name = name
        self.path = path
        self.size = size
        # Built by the primary for this replica (not a file of the history).
        self.snapshot = snapshot
        # The primary found this replica's history different from its own.
        self.diverged = diverged
        self.written = 0
        self.data: bytes | None = None
        self.file: BinaryIO | None = None
        # Snapshots (whole databases) show their progress in status and the logs.
        self.progress: Progress | None = None

    def write(self, data: bytes, last: bool) -> None:
        """Worker thread: append a chunk; close the file after the last one."""
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed on the last chunk
        self.file.write(data)
        self.written += len(data)
        if last:
            self.file.close()

    def discard(self) -> None:
        """Worker thread: close and delete a file that will not be applied."""
        if self.file is not None:
            self.file.close()
        self.path.unlink(missing_ok=True)


class ReplicationClient:
    """Follows the primary at `primary_url` until cancelled."""

    def __init__(
        self,
        store: Store,
        identity: ReplicaIdentity,
        *,
        primary_url: str,
        data_dir: Path,
        cluster_id: str | None,
        reconnect_delay: float = 1.0,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        open_stream: OpenStream = rpc_client.open_stream,
        epoch_scope: str = "static",
        on_handoff: Callable[[pb.Handoff], None] | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.primary_url = primary_url
        self.data_dir = Path(data_dir)
        self.cluster_id = cluster_id or ""
        self.reconnect_delay = reconnect_delay
        self.heartbeat_timeout = heartbeat_timeout
        self._open_stream = open_stream
        self.primary: pb.Hello | None = None
        self.connected = False
        # Set once the first catch-up is complete (Ready); never cleared.
        self.ready = trio.Event()
        self.caught_up = False
        # Fencing: the highest lease epoch seen, persisted per lease (`epoch_scope`).
        self.epoch_scope = epoch_scope
        self.max_epoch = load_max_epoch(self.data_dir, epoch_scope)
        self.stats = ClientStats()
        self.handoff: pb.Handoff | None = None
        self.on_handoff = on_handoff
        # Set when the current stream ends (End frame, error or cancellation).
        self.stream_done = trio.Event()
        self._last_frame = time.monotonic()
        self._needs_snapshot: set[str] = set()
        self._incoming: _Incoming | None = None

    # ------------------------------------------------------- ClusterView

    def primary_hostname(self) -> str | None:
        """The primary's hostname while a stream is up."""
        if self.connected and self.primary is not None:
            return self.primary.hostname
        return None

    def lag_ms(self) -> int:
        """Milliseconds since the last frame from the primary (or since start)."""
        return int((time.monotonic() - self._last_frame) * 1000)

    # ------------------------------------------------------------ fencing

    async def note_epoch(self, epoch: int) -> None:
        """Remember `epoch` (seen in etcd, or held by this node) as the least to accept."""
        if epoch <= self.max_epoch:
            return
        self.max_epoch = epoch
        await trio.to_thread.run_sync(save_max_epoch, self.data_dir, self.epoch_scope, epoch)

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Stream from the primary forever, reconnecting with backoff."""
        failures = 0
        while True:
            try:
                await self._stream_once()
            except (LitefspyError, OSError) as exc:
                self.stats.record_error(str(exc))
                log.warning("replication stream ended %s: %s", kv(primary=self.primary_url), exc)
            except Exception as exc:
                self.stats.record_error(f"unexpected: {exc!r}")
                log.exception("replication stream failed %s", kv(primary=self.primary_url))
            finally:
                was_connected = self.connected
                if was_connected:
                    log.info("disconnected from primary %s", kv(primary=self.primary_url))
                self.connected = False
                self.caught_up = False
            failures = 0 if was_connected else failures + 1
            backoff = self.reconnect_delay * (2 ** max(failures - 1, 0))
            await trio.sleep(min(backoff, max(MAX_BACKOFF, self.reconnect_delay)))

    def _request(self) -> pb.StreamRequest:
        positions = [
            pb.Position(name=db.name, txid=db.pos.txid, checksum=db.pos.checksum)
            for db in self.store.databases()
            if db.pos.txid > 0 and db.name not in self._needs_snapshot
        ]
        return pb.StreamRequest(
            node_id=self.identity.node_id,
            cluster_id=self.cluster_id,
            hostname=self.identity.hostname,
            advertise_url=self.identity.advertise_url,
            positions=positions,
            # Offline databases (startup recovery refused them) are not listed
            # at all: the primary sends each a snapshot, which repairs it and
            # keeps the old copy aside (Store.apply_ltx). A replica has nothing
            # a person must rescue first: the primary holds the good copy.
            offline=[],
        )

    async def _stream_once(self) -> None:
        """One stream, until it ends (End frame) or fails (an exception)."""
        self.stream_done = trio.Event()
        try:
            await self._stream_frames()
        finally:
            self.stream_done.set()

    async def _stream_frames(self) -> None:
        request = self._request()
        log.debug(
            "connecting to primary %s",
            kv(primary=self.primary_url, databases=len(request.positions)),
        )
        async with self._open_stream(self.primary_url, request) as frames:
            hello = await self._receive(frames)
            which = hello.WhichOneof("frame")
            if which != "hello":
                raise ReplicationError(
                    f"protocol error from {self.primary_url}: first frame is {which}, not hello"
                )
            await self._accept_hello(hello.hello)
            self.stats.connects += 1
            self.stats.connected_ms = int(time.time() * 1000)
            try:
                async for frame in self._frames(frames):
                    which = frame.WhichOneof("frame")
                    if which == "ltx":
                        await self._on_chunk(frame.ltx)
                    elif which == "ready":
                        self._on_ready()
                    elif which == "heartbeat":
                        pass
                    elif which == "end":
                        log.info(
                            "primary ended the stream %s",
                            kv(primary=self.primary_url, reason=frame.end.reason),
                        )
                        return
                    elif which == "handoff":
                        self._on_handoff(frame.handoff)
                    else:
                        raise ReplicationError(
                            f"protocol error from {self.primary_url}: unexpected frame {which}"
                        )
            finally:
                incoming, self._incoming = self._incoming, None
                if incoming is not None:
                    if incoming.progress is not None:
                        self.store.progress.stop(incoming.progress)
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(incoming.discard)

    async def _frames(self, frames: FrameStream) -> AsyncIterator[pb.StreamFrame]:
        while True:
            yield await self._receive(frames)

    async def _receive(self, frames: FrameStream) -> pb.StreamFrame:
        try:
            with trio.fail_after(self.heartbeat_timeout):
                frame = await frames.receive()
        except trio.TooSlowError:
            raise ReplicationError(
                f"no data or heartbeat from primary {self.primary_url} in "
                f"{self.heartbeat_timeout:g}s"
            ) from None
        self._last_frame = time.monotonic()
        return frame

    async def _accept_hello(self, hello: pb.Hello) -> None:
        if hello.node_id == self.identity.node_id:
            raise ReplicationError(
                f"refusing to replicate from itself: {self.primary_url} is this node "
                f"({hello.node_id:016X}); set lease.advertise-url to the primary's URL"
            )
        if hello.epoch < self.max_epoch:
            raise ReplicationError(
                f"primary {hello.hostname} has lease epoch {hello.epoch}, older than epoch "
                f"{self.max_epoch} already seen: refusing a stale primary"
            )
        if hello.cluster_id:
            if not valid_cluster_id(hello.cluster_id):
                raise ReplicationError(f"primary sent an invalid cluster id {hello.cluster_id!r}")
            if not self.cluster_id:
                await trio.to_thread.run_sync(save_cluster_id, self.data_dir, hello.cluster_id)
                self.cluster_id = hello.cluster_id
                log.info("joined cluster %s", kv(cluster=hello.cluster_id))
            elif hello.cluster_id != self.cluster_id:
                raise ReplicationError(
                    f"cluster id mismatch: this node belongs to {self.cluster_id}, primary "
                    f"{hello.hostname} to {hello.cluster_id}"
                )
        await self.note_epoch(hello.epoch)
        self.primary = hello
        self.connected = True
        log.info(
            "connected to primary %s",
            kv(
                primary=hello.hostname,
                url=self.primary_url,
                node=f"{hello.node_id:016X}",
                epoch=hello.epoch,
            ),
        )

    def _on_handoff(self, handoff: pb.Handoff) -> None:
        if handoff.target_node_id != self.identity.node_id:
            log.warning(
                "ignoring a lease handoff meant for another node %s",
                kv(target=f"{handoff.target_node_id:016X}", primary=self.primary_url),
            )
            return
        self.handoff = handoff
        log.info("primary hands the lease to this node %s", kv(primary=self.primary_url))
        if self.on_handoff is not None:
            self.on_handoff(handoff)

    def _on_ready(self) -> None:
        if not self.caught_up:
            self.caught_up = True
            log.info("caught up with primary %s", kv(primary=self.primary_url))
        self.ready.set()

    # ------------------------------------------------------------ files

    async def _on_chunk(self, chunk: pb.LTXChunk) -> None:
        """Write one chunk to the incoming file; verify and apply on the last one.

        The file being received is `self._incoming`, so that whatever ends the
        stream (an error here, a torn connection) discards it.
        """
        name = chunk.name
        incoming = self._incoming
        if chunk.first:
            if incoming is not None:
                raise ReplicationError(
                    f"protocol error: new LTX file for {name} before the file for "
                    f"{incoming.name} was complete"
                )
            if not valid_database_name(name):
                raise ReplicationError(f"protocol error: invalid database name {name!r}")
            incoming = _Incoming(
                name,
                self.store.incoming_path(name),
                chunk.size,
                snapshot=chunk.snapshot,
                diverged=chunk.snapshot and chunk.diverged,
            )
            if chunk.snapshot:
                incoming.progress = self.store.progress.start(
                    SNAPSHOT_RECEIVE, name, chunk.size, detail="receiving"
                )
            self._incoming = incoming
        elif incoming is None or incoming.name != name:
            raise ReplicationError(f"protocol error: LTX chunk for {name} without its first chunk")
        if chunk.first and chunk.last:
            # The whole file: applied from these bytes, no copy on disk first.
            incoming.data = chunk.data
            incoming.written = len(chunk.data)
        else:
            await trio.to_thread.run_sync(incoming.write, chunk.data, chunk.last)
        self.stats.bytes_received += len(chunk.data)
        if incoming.progress is not None:
            incoming.progress.advance(len(chunk.data))
        if incoming.written > incoming.size:
            raise ReplicationError(
                f"protocol error: LTX file for {name} is longer than announced "
                f"({incoming.written} > {incoming.size} bytes)"
            )
        if not chunk.last:
            return
        if incoming.written != incoming.size:
            raise ReplicationError(
                f"protocol error: LTX file for {name} is {incoming.written} bytes, "
                f"{incoming.size} announced"
            )
        self._incoming = None
        await self._apply(incoming)

    async def _apply(self, incoming: _Incoming) -> None:
        name = incoming.name
        started = time.perf_counter()
        if incoming.progress is not None:
            incoming.progress.set_detail("applying")
        try:
            source = incoming.data if incoming.data is not None else incoming.path
            pos = await self.store.apply_ltx(name, source, set_aside=incoming.diverged)
        except LitefspyError as exc:
            self.stats.apply_errors += 1
            self._needs_snapshot.add(name)
            log.error(
                "cannot apply LTX from the primary; database unchanged, dropping the stream "
                "(the next one asks for a snapshot) %s: %s",
                kv(db=name, primary=self.primary_url),
                exc,
            )
            raise ReplicationError(f"apply failed for {name}: {exc}") from exc
        finally:
            if incoming.progress is not None:
                incoming.progress.finished()
                self.store.progress.stop(incoming.progress)
            # apply_ltx moved the file into ltx/ (or removed it) on success: the
            # unlink then only meets ENOENT, cheaper here than a thread hop. On
            # failure it removes what is left.
            if incoming.data is None:
                incoming.path.unlink(missing_ok=True)
        self._needs_snapshot.discard(name)
        self.stats.files_applied += 1
        self.stats.applied_by_db[name] = self.stats.applied_by_db.get(name, 0) + 1
        if incoming.snapshot:
            self.stats.snapshots_applied += 1
        log.debug(
            "applied %s",
            kv(
                db=name,
                pos=pos,
                bytes=incoming.size,
                ms=f"{(time.perf_counter() - started) * 1000:.2f}",
            ),
        )


__all__ = ["ClientStats", "ReplicaIdentity", "ReplicationClient"]
