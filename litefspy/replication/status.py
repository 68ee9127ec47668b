"""`Admin.Status`: what a node reports about itself, and its JSON form.

`StatusService.reply` builds the protobuf reply on the node (trio side);
`status_to_dict` turns a reply into the object `litefspy status --json` prints
(docs/INTERFACE.md), so the CLI and tests share one definition of the fields.
The other Admin methods (`Promote`, `Handoff`) are served by the node; their
full names are here so that the node and the CLI share them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from litefspy.errors import SQLiteFormatError
from litefspy.replication.client import ReplicationClient
from litefspy.replication.server import ReplicationServer
from litefspy.sqlite.header import HEADER_SIZE, parse_database_header
from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import FileKind
from litefspy.v1 import admin_pb2 as pb

_ADMIN = pb.DESCRIPTOR.services_by_name["Admin"].full_name
PROMOTE_METHOD = f"/{_ADMIN}/Promote"
HANDOFF_METHOD = f"/{_ADMIN}/Handoff"


@dataclass(frozen=True)
class NodeDescription:
    """This node as status shows it."""

    node_id: int
    hostname: str
    advertise_url: str
    lease_type: str


@dataclass(frozen=True)
class RoleSnapshot:
    """The node's role and lease at one moment (the node builds it on each request).

    `server` is set while this node is the primary, `client` while it follows
    one (or waits for one). `expires_in_ms` is None unless this node holds a
    lease that expires; `holder` is the hostname the lease engine names (None
    when unknown or for a static lease).
    """

    role: str
    epoch: int
    cluster_id: str
    candidate: bool
    server: ReplicationServer | None = None
    client: ReplicationClient | None = None
    expires_in_ms: int | None = None
    holder: str | None = None
    # (ready, why not): see Node.readiness.
    ready: tuple[bool, str] = (True, "")


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


def status_to_dict(reply: pb.StatusReply) -> dict[str, Any]:
    """The JSON object of `litefspy status --json` (docs/INTERFACE.md)."""
    out: dict[str, Any] = {
        "node": {
            "id": reply.node.id,
            "hostname": reply.node.hostname,
            "advertise_url": reply.node.advertise_url,
        },
        "role": reply.role,
        "primary": (
            {
                "id": reply.primary.id,
                "hostname": reply.primary.hostname,
                "advertise_url": reply.primary.advertise_url,
            }
            if reply.HasField("primary")
            else None
        ),
        "lease": {
            "type": reply.lease.type,
            "epoch": reply.lease.epoch,
            "expires_in_ms": (
                reply.lease.expires_in_ms if reply.lease.HasField("expires_in_ms") else None
            ),
        },
        "cluster_id": reply.cluster_id or None,
        "candidate": reply.candidate,
        "ready": reply.ready,
        "not_ready_reason": reply.not_ready_reason or None,
        "progress": [
            {
                "kind": p.kind,
                "name": p.name,
                "done_bytes": p.done_bytes,
                "total_bytes": p.total_bytes,
                "percent": (
                    round(100.0 * p.done_bytes / p.total_bytes, 1) if p.total_bytes else None
                ),
                "rate_bytes_per_second": round(p.rate_bytes_per_second),
                "elapsed_ms": p.elapsed_ms,
                "phase": p.phase or None,
            }
            for p in reply.progress
        ],
        "databases": [
            {
                "name": d.name,
                "txid": f"{d.txid:016x}",
                "checksum": f"{d.checksum:016x}",
                "journal_mode": d.journal_mode,
                "size_bytes": d.size_bytes,
                "lag_ms": d.lag_ms,
                "exists": d.exists,
                "halt_holder": d.halt_holder if d.HasField("halt_holder") else None,
            }
            for d in reply.databases
        ],
        "replicas": [
            {
                "node": r.node.id,
                "hostname": r.node.hostname,
                "advertise_url": r.node.advertise_url,
                "connected_at_ms": r.connected_at_ms,
                "files_sent": r.files_sent,
                "snapshots_sent": r.snapshots_sent,
                "bytes_sent": r.bytes_sent,
                "ready": r.ready,
                "databases": [{"name": d.name, "txid": f"{d.txid:016x}"} for d in r.databases],
            }
            for r in reply.replicas
        ],
    }
    # Only engines that elect a holder have one to show (a static lease has none).
    if reply.lease.HasField("holder"):
        out["lease"]["holder"] = reply.lease.holder
    if reply.HasField("replication"):
        r = reply.replication
        out["replication"] = {
            "connected": r.connected,
            "ready": r.ready,
            "connects": r.connects,
            "files_applied": r.files_applied,
            "snapshots_applied": r.snapshots_applied,
            "bytes_received": r.bytes_received,
            "apply_errors": r.apply_errors,
            "last_error": r.last_error or None,
            "last_error_age_ms": r.last_error_age_ms if r.last_error else None,
            "last_error_healed": r.last_error_healed,
        }
    if reply.HasField("backup"):
        b = reply.backup
        out["backup"] = {
            "target": b.target,
            "uploading": b.uploading,
            "bytes_uploaded": b.bytes_uploaded,
            "objects_uploaded": b.objects_uploaded,
            "errors": b.errors,
            "databases": [
                {
                    "name": d.name,
                    "uploaded_txid": f"{d.uploaded_txid:016x}",
                    "lag_ms": d.lag_ms,
                    "lag_txids": d.lag_txids,
                    "last_error": d.last_error or None,
                    "last_error_age_ms": d.last_error_age_ms if d.last_error else None,
                }
                for d in b.databases
            ],
        }
    return out
