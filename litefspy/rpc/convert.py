"""Protobuf replies turned into plain data (for the CLI's JSON and the tests)."""

from __future__ import annotations

from typing import Any

from litefspy.v1 import admin_pb2 as pb


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
