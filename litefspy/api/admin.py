"""The Admin service: `Status` (what a node reports about itself), `Promote`, `Handoff`.

`StatusService.reply` builds the protobuf reply on the node (trio side);
`litefspy.rpc.convert.status_to_dict` turns a reply into the object
`litefspy status --json` prints (docs/INTERFACE.md).
`AdminService` serves the other Admin methods (`Promote`, `Handoff`), which
delegate to `litefspy.cluster.handoff`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from litefspy.cluster.handoff import PROMOTE_TIMEOUT, Handoffs
from litefspy.cluster.roles import Cluster
from litefspy.cluster.state import RoleSnapshot
from litefspy.errors import SQLiteFormatError
from litefspy.lease.base import PrimaryInfo
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.methods import HANDOFF_METHOD, PROMOTE_METHOD
from litefspy.rpc.server import GRPCServer
from litefspy.sqlite.header import HEADER_SIZE, parse_database_header
from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import FileKind
from litefspy.v1 import admin_pb2 as pb


@dataclass(frozen=True)
class NodeDescription:
    """This node as status shows it."""

    node_id: int
    hostname: str
    advertise_url: str
    lease_type: str


@dataclass(frozen=True)
class _DatabaseFacts:
    name: str
    txid: int
    checksum: int
    exists: bool
    committed_size: int | None
    database: Path
    journal: Path


def journal_mode(database: Path, journal: Path) -> str:
    """Best guess of the journal mode from the files (SQLite keeps it per connection).

    WAL is recorded in the database header. The rollback modes differ only in
    what they leave behind after a commit: nothing (delete), an empty journal
    (truncate) or one with a zeroed header (persist).
    """
    try:
        with open(database, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if parse_database_header(raw).is_wal:
            return "wal"
    except (OSError, SQLiteFormatError):
        pass  # empty or unreadable header: not (yet) a WAL database
    try:
        size = os.stat(journal).st_size
    except OSError:
        return "delete"
    return "truncate" if size == 0 else "persist"


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _describe_databases(facts: list[_DatabaseFacts]) -> list[tuple[_DatabaseFacts, str, int]]:
    out = []
    for f in facts:
        mode = journal_mode(f.database, f.journal) if f.exists else "delete"
        size = f.committed_size if f.committed_size is not None else _file_size(f.database)
        out.append((f, mode, size if f.exists else 0))
    return out


def role_snapshot(cluster: Cluster) -> RoleSnapshot:
    """The role and lease `Admin.Status` shows, at this moment."""
    lease = cluster.lease if cluster.is_primary() else None
    expires_in: int | None = None
    if lease is not None and math.isfinite(lease.deadline()):
        expires_in = max(0, int((lease.deadline() - trio.current_time()) * 1000))
    holder: str | None = None
    if cluster.leaser is not None and not cluster.leaser.fixed_primary:
        if lease is not None:
            holder = cluster.hostname
        elif cluster.lease_state is not None and cluster.lease_state.primary is not None:
            holder = cluster.lease_state.primary.hostname
    return RoleSnapshot(
        role=cluster.state.role,
        epoch=cluster.lease_epoch(),
        cluster_id=cluster.cluster_id,
        candidate=cluster.candidate,
        server=cluster.server if cluster.is_primary() else None,
        client=cluster.client,
        expires_in_ms=expires_in,
        holder=holder,
        ready=cluster.readiness(),
    )


class StatusService:
    """Builds `Admin.Status` replies from the store and the node's `RoleSnapshot`."""

    def __init__(
        self,
        store: Store,
        node: NodeDescription,
        snapshot: Callable[[], RoleSnapshot],
        backup: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.store = store
        self.node = node
        self.snapshot = snapshot
        self.backup = backup

    def _halt_holder(self, name: str) -> str | None:
        halt = self.store.halts.get(name)
        if halt is not None:
            return halt.holder
        db = self.store.get_if_online(name)
        return self.node.hostname if db is not None and db.forward is not None else None

    async def reply(self) -> pb.StatusReply:
        """The current status (runs on the trio loop; file reads in a thread)."""
        snap = self.snapshot()
        facts = [_facts(db) for db in self.store.databases()]
        described = await trio.to_thread.run_sync(_describe_databases, facts)
        me = pb.NodeInfo(
            id=f"{self.node.node_id:016X}",
            hostname=self.node.hostname,
            advertise_url=self.node.advertise_url,
        )
        reply = pb.StatusReply(
            node=me,
            role=snap.role,
            lease=pb.LeaseStatus(type=self.node.lease_type, epoch=snap.epoch),
            cluster_id=snap.cluster_id,
            candidate=snap.candidate,
            ready=snap.ready[0],
            not_ready_reason=snap.ready[1],
        )
        for work in self.store.progress.reports():
            reply.progress.append(
                pb.ProgressStatus(
                    kind=work.kind,
                    name=work.name,
                    done_bytes=work.done_bytes,
                    total_bytes=work.total_bytes,
                    rate_bytes_per_second=work.rate_bytes_per_s,
                    elapsed_ms=int(work.elapsed_s * 1000),
                    phase=work.detail,
                )
            )
        if snap.expires_in_ms is not None:
            reply.lease.expires_in_ms = snap.expires_in_ms
        if snap.holder is not None:
            reply.lease.holder = snap.holder
        server = snap.server
        client = None if server is not None else snap.client
        lag = client.lag_ms() if client is not None else 0
        for f, mode, size in described:
            status = pb.DatabaseStatus(
                name=f.name,
                txid=f.txid,
                checksum=f.checksum,
                journal_mode=mode,
                size_bytes=size,
                lag_ms=lag,
                exists=f.exists,
            )
            holder = self._halt_holder(f.name)
            if holder is not None:
                status.halt_holder = holder
            reply.databases.append(status)
        if server is not None:
            reply.primary.CopyFrom(me)
            known = {f.name for f in facts}
            for s in list(server.sessions):
                replica = pb.ReplicaStatus(
                    node=pb.NodeInfo(
                        id=f"{s.node_id:016X}", hostname=s.hostname, advertise_url=s.advertise_url
                    ),
                    connected_at_ms=s.connected_at_ms,
                    files_sent=s.files_sent,
                    snapshots_sent=s.snapshots_sent,
                    bytes_sent=s.bytes_sent,
                    ready=s.ready,
                )
                for name in sorted(s.positions):
                    if name not in known:
                        continue  # deleted here and forgotten after retention
                    replica.databases.append(
                        pb.ReplicaDatabase(name=name, txid=s.positions[name].txid)
                    )
                reply.replicas.append(replica)
        if client is not None:
            primary = client.primary if client.connected else None
            if primary is not None:
                reply.primary.CopyFrom(
                    pb.NodeInfo(
                        id=f"{primary.node_id:016X}",
                        hostname=primary.hostname,
                        advertise_url=primary.advertise_url,
                    )
                )
                reply.lease.epoch = max(reply.lease.epoch, primary.epoch)
            stats = client.stats
            reply.replication.CopyFrom(
                pb.ReplicationStatus(
                    connected=client.connected,
                    ready=client.caught_up,
                    connects=stats.connects,
                    files_applied=stats.files_applied,
                    snapshots_applied=stats.snapshots_applied,
                    bytes_received=stats.bytes_received,
                    apply_errors=stats.apply_errors,
                    last_error=stats.last_error,
                    last_error_age_ms=(
                        max(0, int(time.time() * 1000) - stats.last_error_ms)
                        if stats.last_error
                        else 0
                    ),
                    last_error_healed=stats.error_healed(client.connected),
                )
            )
        backup = self.backup()
        if backup is not None:
            reply.backup.CopyFrom(_backup_status(backup))
        return reply


def _backup_status(report: dict[str, Any]) -> pb.BackupStatus:
    out = pb.BackupStatus(
        target=report["target"],
        uploading=report["uploading"],
        bytes_uploaded=report["bytes_uploaded"],
        objects_uploaded=report["objects_uploaded"],
        errors=report["errors"],
    )
    for name, d in sorted(report["databases"].items()):
        out.databases.append(
            pb.BackupDatabaseStatus(
                name=name,
                uploaded_txid=int(d["uploaded_txid"], 16),
                lag_ms=d["lag_ms"],
                lag_txids=d["lag_txids"],
                last_error=d["last_error"],
                last_error_age_ms=d["last_error_age_ms"],
            )
        )
    return out


def _facts(db: Database) -> _DatabaseFacts:
    ck = db.checksums
    return _DatabaseFacts(
        name=db.name,
        txid=db.pos.txid,
        checksum=db.pos.checksum,
        exists=db.exists(),
        committed_size=ck.page_count * ck.page_size if ck is not None else None,
        database=db.path(FileKind.DATABASE),
        journal=db.path(FileKind.JOURNAL),
    )


class AdminService:
    """`Admin.Promote` and `Admin.Handoff`: parse the request, ask `Handoffs`, reply."""

    def __init__(self, handoffs: Handoffs) -> None:
        self.handoffs = handoffs

    def register(self, server: GRPCServer) -> None:
        """Add Promote and Handoff to the server (Status is its built-in handler)."""
        server.add_unary(PROMOTE_METHOD, self.promote)
        server.add_unary(HANDOFF_METHOD, self.handoff)

    async def promote(self, request: pb.PromoteRequest) -> pb.PromoteReply:
        """Target side of `litefspy run --promote`: become primary through a handoff."""
        cluster = self.handoffs.cluster
        if cluster.is_primary():
            return pb.PromoteReply(already_primary=True, epoch=cluster.lease_epoch())
        previous = await self.handoffs.promote(request.timeout_seconds or PROMOTE_TIMEOUT)
        return pb.PromoteReply(epoch=cluster.lease_epoch(), previous_primary=previous)

    async def handoff(self, request: pb.HandoffRequest) -> pb.HandoffReply:
        """Primary side: stop writes, let the target catch up, hand it the lease."""
        self.handoffs.check_primary()
        try:
            target_id = int(request.target.id, 16)
        except ValueError:
            raise RPCRefused(
                Code.INVALID_ARGUMENT, f"invalid node id {request.target.id!r}"
            ) from None
        target = PrimaryInfo(
            hostname=request.target.hostname,
            advertise_url=request.target.advertise_url,
            node_id=request.target.id,
        )
        token, positions = await self.handoffs.hand_off(target_id, target)
        return pb.HandoffReply(
            token=token.to_json(),
            positions=[
                pb.HandoffPosition(name=p.name, txid=p.txid, checksum=p.checksum) for p in positions
            ],
        )
