"""`Data.Import` and `Data.Export`: whole databases in and out of a running node.

Import streams a SQLite file to the primary, which spools it under
`<data>/tmp/` and hands it to `Store.import_database` (validated, then applied
as one new TXID under SQLite's locks, so replicas receive it like any commit).
Export asks any node for a consistent copy of its committed state
(`Store.export_database`) and streams it back. The CLI side of both is
`litefspy import` / `litefspy export`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from litefspy.cluster.view import NodeView
from litefspy.errors import DatabaseError, NotFoundError
from litefspy.logs import kv
from litefspy.progress import EXPORT, IMPORT, Progress
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.server import GRPCServer
from litefspy.store.files import valid_database_name
from litefspy.store.types import Position
from litefspy.v1 import data_pb2 as pb

log = logging.getLogger(__name__)

_DATA = pb.DESCRIPTOR.services_by_name["Data"].full_name
IMPORT_METHOD = f"/{_DATA}/Import"
EXPORT_METHOD = f"/{_DATA}/Export"
# Bytes per streamed message (gRPC messages are capped at 8 MiB by the bridge).
CHUNK_SIZE = 512 * 1024


class DataService:
    """Import / Export handlers for one node (trio side of the RPCs)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    def register(self, server: GRPCServer) -> None:
        server.add_client_stream(IMPORT_METHOD, self.import_)
        server.add_server_stream(EXPORT_METHOD, self.export)

    @property
    def _hostname(self) -> str:
        return self.node.config.lease.hostname

    def _tmp_path(self, kind: str, name: str) -> Path:
        return self.node.store.tmp_dir / f"{kind}-{name}.{secrets.token_hex(6)}.tmp"

    def _require_primary(self, name: str) -> None:
        if not self.node.is_primary():
            primary = self.node.primary_hostname() or "unknown"
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cannot import {name}: node {self._hostname} is not the primary "
                f"(primary is {primary}); import on the primary",
            )

    # ------------------------------------------------------------- import

    async def import_(
        self, requests: trio.MemoryReceiveChannel[pb.ImportRequest], peer: str
    ) -> pb.ImportReply:
        """Receive `start` then the file's chunks; import it; reply with the new position."""
        first = await next_or_none(requests)
        if first is None or first.WhichOneof("part") != "start":
            raise RPCRefused(
                Code.INVALID_ARGUMENT, "an import must start with the database name (start)"
            )
        name, size = first.start.name, first.start.size
        if not valid_database_name(name):
            raise RPCRefused(Code.INVALID_ARGUMENT, f"invalid database name {name!r}")
        self._require_primary(name)
        tmp = self._tmp_path("import", name)
        with self.node.store.progress.track(IMPORT, name, size, detail="receiving") as progress:
            pos = await self._import(name, size, requests, tmp, progress)
        log.info("import done %s", kv(db=name, bytes=size, pos=pos, peer=peer))
        return pb.ImportReply(name=name, txid=pos.txid, checksum=pos.checksum)

    async def _import(
        self,
        name: str,
        size: int,
        requests: trio.MemoryReceiveChannel[pb.ImportRequest],
        tmp: Path,
        progress: Progress,
    ) -> Position:
        try:
            received = await receive_file(requests, tmp, on_data=progress.advance)
            if received != size:
                raise RPCRefused(
                    Code.INVALID_ARGUMENT,
                    f"cannot import {name}: the upload ended after {received} of {size} bytes",
                )
            self._require_primary(name)  # the role may have changed during the upload
            try:
                pos = await self.node.store.import_database(name, tmp, progress)
            except DatabaseError as exc:
                # Name the user's upload, not the node's spool file.
                message = str(exc).replace(str(tmp), "the uploaded file")
                raise RPCRefused(
                    Code.FAILED_PRECONDITION, f"cannot import {name}: {message}"
                ) from None
        finally:
            await trio.to_thread.run_sync(partial(tmp.unlink, missing_ok=True))
        return pos

    # ------------------------------------------------------------- export

    async def export(
        self, request: pb.ExportRequest, peer: str, send: trio.MemorySendChannel[pb.ExportChunk]
    ) -> None:
        """Send `start` (position and size) then the consistent copy in chunks."""
        name = request.name
        try:
            db = self.node.store.get(name)
        except NotFoundError as exc:
            raise RPCRefused(Code.FAILED_PRECONDITION, f"cannot export {name}: {exc}") from None
        if db is None:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"cannot export {name}: node {self._hostname} has no database named {name}",
            )
        tmp = self._tmp_path("export", name)
        with self.node.store.progress.track(EXPORT, name, 0) as progress:
            size, pos = await self._export(name, tmp, send, progress)
        log.info("export done %s", kv(db=name, bytes=size, pos=pos, peer=peer))

    async def _export(
        self,
        name: str,
        tmp: Path,
        send: trio.MemorySendChannel[pb.ExportChunk],
        progress: Progress,
    ) -> tuple[int, Position]:
        try:
            await trio.to_thread.run_sync(_mkdir, tmp.parent)
            try:
                pos = await self.node.store.export_database(name, tmp, progress)
            except DatabaseError as exc:
                raise RPCRefused(Code.FAILED_PRECONDITION, f"cannot export {name}: {exc}") from None
            size = (await trio.Path(tmp).stat()).st_size
            progress.next_phase("sending", size)
            async with await trio.open_file(tmp, "rb") as f:
                start = pb.ExportStart(name=name, txid=pos.txid, checksum=pos.checksum, size=size)
                await send.send(pb.ExportChunk(start=start))
                while chunk := await f.read(CHUNK_SIZE):
                    await send.send(pb.ExportChunk(data=chunk))
                    progress.advance(len(chunk))
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(tmp.unlink, missing_ok=True))
        return size, pos


async def next_or_none(requests: trio.MemoryReceiveChannel[Any]) -> Any:
    """The first message of a client stream, or None if it sent nothing."""
    try:
        return await requests.receive()
    except trio.EndOfChannel:
        return None


async def receive_file(
    requests: trio.MemoryReceiveChannel[Any],
    out: Path,
    *,
    what: str = "an import",
    on_data: Callable[[int], None] | None = None,
) -> int:
    """Write every `data` chunk of an upload to `out`; the number of bytes received.

    `on_data(n)` is called after each chunk (progress).
    """
    await trio.to_thread.run_sync(_mkdir, out.parent)
    received = 0
    async with await trio.open_file(out, "wb") as f:
        async for request in requests:
            if request.WhichOneof("part") != "data":
                raise RPCRefused(Code.INVALID_ARGUMENT, f"{what} has exactly one start message")
            await f.write(request.data)
            received += len(request.data)
            if on_data is not None:
                on_data(len(request.data))
    return received


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
