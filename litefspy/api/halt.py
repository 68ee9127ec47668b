"""Write forwarding for occasional writers: `litefspy run --with-halt-lock-on DB`.

A replica is read-only, but a migration or an admin script sometimes has to
write from wherever it runs. The halt lock makes that safe:

1. The CLI calls `Halt.Hold` on its own node and keeps the call open while the
   command runs. On the primary nothing is needed (the command writes as usual).
2. A replica asks the primary for `Halt.Lock`: the primary takes SQLite's writer
   locks on the database through its mount (its own writers wait, readers go
   on) and answers with its position. The replica waits until it has applied
   everything up to that position, then accepts writes to that one database.
3. Every transaction the command commits on the replica is captured as usual
   (an LTX file), but before the commit returns to SQLite the file is sent to
   the primary (`Halt.Commit`), which applies it as its next TXID (durably) and
   replicates it to every replica. If the primary does not confirm, the commit
   fails on the replica exactly like a commit that hit a full disk: SQLite rolls
   it back, and nothing of it stays anywhere. If the primary applied it but the
   answer was lost, the replica rolls back and then receives it by replication.
4. The primary drops the lock when the Lock call ends (command done, CLI or
   replica node gone) or when no `Renew` arrived for `ttl`; the replica stops
   accepting writes when the Hold call ends or the Lock call fails, and settles
   its files (WAL folded in, hot journal rolled back) so that only the
   committed state stays.

A forwarded commit's capture runs in a worker thread (Store.file_op) for the
one round trip to the primary, holding the database's capture lock so that a
replica apply of the same database cannot interleave with it; the rest of the
node (its stream, heartbeats, RPCs, proxy and other databases) goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import trio

from litefspy.api.data import CHUNK_SIZE, next_or_none, receive_file
from litefspy.cluster.view import NodeView
from litefspy.errors import DatabaseError, ForwardError, LTXError, ReplicationError
from litefspy.logs import kv
from litefspy.rpc.client import Client, MessageStream, acall_unary, open_server_stream
from litefspy.rpc.errors import Code, RemoteError, RPCRefused
from litefspy.rpc.server import GRPCServer
from litefspy.store.files import valid_database_name
from litefspy.store.halt import Halt
from litefspy.v1 import halt_pb2 as pb

log = logging.getLogger(__name__)

_HALT = pb.DESCRIPTOR.services_by_name["Halt"].full_name
HOLD_METHOD = f"/{_HALT}/Hold"
LOCK_METHOD = f"/{_HALT}/Lock"
RENEW_METHOD = f"/{_HALT}/Renew"
COMMIT_METHOD = f"/{_HALT}/Commit"

# The primary drops a halt lock that no Renew or Commit reached for this long.
HALT_TTL = 10.0
RENEW_INTERVAL = 2.0
HEARTBEAT_INTERVAL = 1.0
# Default wait for the primary's writers in progress (or another halt holder).
DEFAULT_WAIT = 10.0
# How long a replica may take to apply everything up to the lock's position.
CATCH_UP_TIMEOUT = 30.0
# One forwarded commit, end to end (the committing application waits meanwhile).
COMMIT_TIMEOUT = 15.0
# Forwarded transactions up to this size are received in memory, larger ones
# are spooled to a file.
INLINE_COMMIT_BYTES = 8 << 20


class Forwarder:
    """Sends one captured transaction to the primary (runs in a worker thread)."""

    def __init__(self, url: str, name: str, halt_id: str, primary: str) -> None:
        self.name = name
        self.halt_id = halt_id
        self.primary = primary
        self.client = Client(url)

    def _requests(self, path: Path, size: int) -> Iterator[pb.CommitRequest]:
        yield pb.CommitRequest(
            start=pb.CommitStart(name=self.name, halt_id=self.halt_id, size=size)
        )
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                yield pb.CommitRequest(data=chunk)

    def __call__(self, path: Path, txid: int, checksum: int) -> None:
        size = path.stat().st_size
        try:
            reply = self.client.client_stream(
                COMMIT_METHOD,
                self._requests(path, size),
                request_type=pb.CommitRequest,
                response_type=pb.CommitReply,
                timeout=COMMIT_TIMEOUT,
            )
        except ReplicationError as exc:
            log.error("forwarded commit failed %s: %s", kv(db=self.name, txid=f"{txid:016x}"), exc)
            raise ForwardError(
                f"commit to {self.name} was not accepted by the primary {self.primary}: {exc}"
            ) from None
        if (reply.txid, reply.checksum) != (txid, checksum):
            raise ForwardError(
                f"the primary {self.primary} applied the commit to {self.name} as "
                f"{reply.txid:016x}/{reply.checksum:016x}, expected {txid:016x}/{checksum:016x}"
            )


class HaltService:
    """The Halt RPCs of one node: Hold (CLI side) and Lock/Renew/Commit (primary side)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    def register(self, server: GRPCServer) -> None:
        server.add_server_stream(HOLD_METHOD, self.hold)
        server.add_server_stream(LOCK_METHOD, self.lock)
        server.add_unary(RENEW_METHOD, self.renew)
        server.add_client_stream(COMMIT_METHOD, self.commit)

    @property
    def _hostname(self) -> str:
        return self.node.config.lease.hostname

    @staticmethod
    def _check_name(name: str) -> None:
        if not valid_database_name(name):
            raise RPCRefused(Code.INVALID_ARGUMENT, f"invalid database name {name!r}")

    # ------------------------------------------------------------ primary

    async def lock(
        self, request: pb.LockRequest, peer: str, send: trio.MemorySendChannel[pb.LockEvent]
    ) -> None:
        """Pause this primary's writers of a database until the call ends or the TTL lapses."""
        name = request.name
        self._check_name(name)
        if not self.node.is_primary():
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cannot halt {name}: node {self._hostname} is not the primary",
            )
        holder = request.holder or peer
        ttl = request.ttl_ms / 1000 if request.ttl_ms else HALT_TTL
        wait = request.timeout_seconds if request.timeout_seconds > 0 else DEFAULT_WAIT
        store = self.node.store
        try:
            halt = await store.begin_halt(name, holder, ttl, wait)
        except DatabaseError as exc:
            raise RPCRefused(Code.FAILED_PRECONDITION, str(exc)) from None
        try:
            db = store.get(name)
            assert db is not None
            acquired = pb.LockAcquired(
                halt_id=halt.id,
                txid=db.pos.txid,
                checksum=db.pos.checksum,
                epoch=self.node.lease_epoch(),
            )
            await send.send(pb.LockEvent(acquired=acquired))
            while True:
                await trio.sleep(min(HEARTBEAT_INTERVAL, ttl / 3))
                if not halt.active:
                    why = store.failed.get(name) or f"{self._hostname} is no longer the primary"
                    raise RPCRefused(Code.UNAVAILABLE, f"halt lock on {name} ended: {why}")
                if trio.current_time() > halt.expires:
                    log.warning(
                        "halt lock expired (no renewal) %s", kv(db=name, holder=holder, ttl=ttl)
                    )
                    raise RPCRefused(
                        Code.UNAVAILABLE,
                        f"halt lock on {name} expired: no renewal for {ttl:g} s",
                    )
                await send.send(pb.LockEvent(heartbeat=pb.HaltHeartbeat()))
        finally:
            await store.end_halt(halt)

    def _halt(self, name: str, halt_id: str) -> Halt:
        halt = self.node.store.halts.get(name)
        if halt is None or halt.id != halt_id or not halt.active:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"no halt lock {halt_id or '(none)'} is held on {name} at {self._hostname}",
            )
        return halt

    async def renew(self, request: pb.RenewRequest) -> pb.RenewReply:
        self._halt(request.name, request.halt_id).renew()
        return pb.RenewReply()

    async def commit(
        self, requests: trio.MemoryReceiveChannel[pb.CommitRequest], peer: str
    ) -> pb.CommitReply:
        """Receive one forwarded LTX file and apply it as this primary's next TXID."""
        first = await next_or_none(requests)
        if first is None or first.WhichOneof("part") != "start":
            raise RPCRefused(Code.INVALID_ARGUMENT, "a commit must start with `start`")
        name, size = first.start.name, first.start.size
        self._check_name(name)
        halt = self._halt(name, first.start.halt_id)
        store = self.node.store
        if size > INLINE_COMMIT_BYTES:
            # Large transaction: spooled to a file instead of held in memory.
            tmp = store.incoming_path(name)
            try:
                received = await receive_file(requests, tmp, what="a commit")
            except BaseException:
                await trio.to_thread.run_sync(partial(tmp.unlink, missing_ok=True))
                raise
            upload: bytes | Path = tmp
        else:
            chunks = []
            received = 0
            async for request in requests:
                if request.WhichOneof("part") != "data":
                    raise RPCRefused(
                        Code.INVALID_ARGUMENT, "a commit has exactly one start message"
                    )
                received += len(request.data)
                if received > size:
                    break
                chunks.append(request.data)
            upload = b"".join(chunks)
        try:
            if received != size:
                what = "is longer than" if received > size else f"ended after {received} of"
                raise RPCRefused(
                    Code.INVALID_ARGUMENT,
                    f"commit to {name}: the upload {what} the announced {size} bytes",
                )
            pos = await store.apply_forwarded(halt, upload)
        except (DatabaseError, LTXError, OSError) as exc:
            raise RPCRefused(Code.FAILED_PRECONDITION, f"commit to {name} refused: {exc}") from None
        finally:
            if isinstance(upload, Path):
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(partial(upload.unlink, missing_ok=True))
        del peer
        return pb.CommitReply(txid=pos.txid, checksum=pos.checksum)

    # ------------------------------------------------------------ CLI side

    async def hold(
        self, request: pb.HoldRequest, peer: str, send: trio.MemorySendChannel[pb.HoldEvent]
    ) -> None:
        """Hold the halt lock for the CLI until it goes away (see module docs)."""
        name = request.name
        self._check_name(name)
        store = self.node.store
        if self.node.is_primary():
            db = store.get(name)
            acquired = pb.HoldAcquired(
                on_primary=True,
                primary=self._hostname,
                txid=db.pos.txid if db is not None else 0,
                checksum=db.pos.checksum if db is not None else 0,
            )
            await send.send(pb.HoldEvent(acquired=acquired))
            await _heartbeats(send)
            return
        url = self.node.primary_advertise_url()
        primary = self.node.primary_hostname() or "the primary"
        if url is None:
            # Not UNAVAILABLE: the CLI would report this node as unreachable.
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cannot get the halt lock on {name}: node {self._hostname} is not "
                "connected to a primary",
            )
        wait = request.timeout_seconds if request.timeout_seconds > 0 else DEFAULT_WAIT
        lock = pb.LockRequest(
            name=name, holder=self._hostname, ttl_ms=int(HALT_TTL * 1000), timeout_seconds=wait
        )
        async with open_server_stream(url, LOCK_METHOD, lock, pb.LockEvent) as stream:
            try:
                with trio.fail_after(wait + COMMIT_TIMEOUT):
                    first = await stream.receive()
            except (ReplicationError, trio.TooSlowError) as exc:
                raise RPCRefused(
                    Code.FAILED_PRECONDITION,
                    f"cannot get the halt lock on {name} from {primary}: {_reason(exc)}",
                ) from None
            if first.WhichOneof("event") != "acquired":
                raise RPCRefused(Code.INTERNAL, f"{primary} answered the halt lock out of order")
            got = first.acquired
            await self._catch_up(name, got.txid, got.checksum, primary)
            forwarder = Forwarder(url, name, got.halt_id, primary)
            store.begin_forwarding(name, forwarder)
            log.info(
                "halt lock held; writes forwarded to the primary %s",
                kv(db=name, primary=primary, txid=f"{got.txid:016x}", peer=peer),
            )
            try:
                acquired = pb.HoldAcquired(primary=primary, txid=got.txid, checksum=got.checksum)
                await send.send(pb.HoldEvent(acquired=acquired))
                failure = await _first_failure(
                    lambda: _heartbeats(send),
                    lambda: self._renew_until_failure(url, name, got.halt_id, primary),
                    lambda: _watch_lock(stream, name, primary),
                )
                log.warning("halt lock lost %s: %s", kv(db=name), failure)
                # Tell the CLI at once: settling may wait for the command's
                # transaction in progress, which is about to fail.
                await send.send(pb.HoldEvent(lost=pb.HoldLost(reason=failure)))
            finally:
                await store.end_forwarding(name)
                forwarder.client.close()
                log.info("halt lock ended %s", kv(db=name, primary=primary))

    async def _catch_up(self, name: str, txid: int, checksum: int, primary: str) -> None:
        """Wait until this replica has applied everything up to the primary's position."""
        store = self.node.store
        with store.feed.watch() as commits, trio.move_on_after(CATCH_UP_TIMEOUT):
            while True:
                db = store.get(name)
                if db is not None and db.pos.txid >= txid:
                    break
                await commits.wait()
        db = store.get(name)
        if db is None or db.pos.txid < txid:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cannot take the halt lock on {name}: this replica did not catch up with "
                f"{primary} (txid {txid:016x}) within {CATCH_UP_TIMEOUT:g} s",
            )
        if db.pos.txid != txid or db.pos.checksum != checksum:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cannot take the halt lock on {name}: this replica is at {db.pos}, the "
                f"primary {primary} at {txid:016x}/{checksum:016x}",
            )

    async def _renew_until_failure(self, url: str, name: str, halt_id: str, primary: str) -> str:
        request = pb.RenewRequest(name=name, halt_id=halt_id)
        while True:
            await trio.sleep(RENEW_INTERVAL)
            try:
                await acall_unary(
                    url, RENEW_METHOD, request, pb.RenewReply, deadline=RENEW_INTERVAL * 2
                )
            except ReplicationError as exc:
                return f"halt lock on {name} lost: {primary} did not renew it: {_reason(exc)}"


async def _watch_lock(stream: MessageStream, name: str, primary: str) -> str:
    """Return why the primary's Lock call ended (it only ends on a failure)."""
    while True:
        try:
            await stream.receive()
        except ReplicationError as exc:
            return f"halt lock on {name} lost: {primary}: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    """The primary's own words when it answered, else what went wrong with the call."""
    if isinstance(exc, RemoteError) and exc.details:
        return exc.details
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    return str(exc)


async def _heartbeats(send: trio.MemorySendChannel[pb.HoldEvent]) -> str:
    """Tell the CLI the lock is still held, until it goes away (the call is cancelled)."""
    while True:
        await trio.sleep(HEARTBEAT_INTERVAL)
        await send.send(pb.HoldEvent(heartbeat=pb.HaltHeartbeat()))


async def _first_failure(*tasks: Callable[[], Awaitable[str]]) -> str:
    """Run the tasks until one returns a failure message; that message."""
    failure: str | None = None
    async with trio.open_nursery() as nursery:

        async def run(task: Callable[[], Awaitable[str]]) -> None:
            nonlocal failure
            message = await task()
            if failure is None:
                failure = message
            nursery.cancel_scope.cancel()

        for task in tasks:
            nursery.start_soon(run, task)
    assert failure is not None
    return failure
