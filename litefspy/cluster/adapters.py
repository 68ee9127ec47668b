"""What the mount, the proxy and the metrics endpoint need, computed from the node.

`MountView` implements `litefspy.fuse.ops.ClusterView` (what `.primary` and
`.lag` show); `NodeProxyState` implements `litefspy.proxy.ProxyState`;
`NodeMetricsSource` implements `litefspy.metrics.NodeMetricsSource`. The
last two read a `NodeView` and answer on the trio
thread from memory: the proxy's TXID waits are woken by store commits, and
the metrics' LTX file counts are kept up to date by commit notifications plus
a periodic recount in a worker thread (retention removes files), so a scrape
never lists a directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from litefspy.cluster.roles import Cluster
from litefspy.cluster.view import NodeView
from litefspy.config import split_host_port
from litefspy.errors import NotFoundError
from litefspy.logs import kv
from litefspy.metrics import DbStats, ReplicaLink, ReplicationStats
from litefspy.proxy import TxidWaiters
from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import CommitInfo

log = logging.getLogger(__name__)

# How often the LTX file counts and sizes are recounted from disk.
LTX_RECOUNT_INTERVAL = 10.0


class MountView:
    """What `.primary` and `.lag` show (`litefspy.fuse.ops.ClusterView`)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def primary_hostname(self) -> str | None:
        cluster = self._cluster
        return None if cluster.is_primary() else cluster.client.primary_hostname()

    def lag_ms(self) -> int:
        return self._cluster.lag_ms()

    def not_ready_reason(self) -> str | None:
        cluster = self._cluster
        return None if cluster.readiness()[0] else cluster.not_ready_reason()


def replication_stats(cluster: Cluster) -> ReplicationStats:
    """Both sides of replication since start (metrics)."""
    totals, stats = cluster.send_totals, cluster.client.stats
    server = cluster.server if cluster.is_primary() else None
    return ReplicationStats(
        files_sent=totals.files,
        snapshots_sent=totals.snapshots,
        bytes_sent=totals.bytes,
        send_errors=totals.errors,
        replicas=[ReplicaLink(s.hostname, True) for s in (server.sessions if server else [])],
        connected_to_primary=not cluster.is_primary() and cluster.client.connected,
        files_applied=stats.files_applied,
        snapshots_applied=stats.snapshots_applied,
        bytes_received=stats.bytes_received,
        receive_errors=stats.errors,
    )


def local_txid(store: Store, name: str) -> int:
    """The local TXID of `name`, 0 when the database is absent or offline."""
    try:
        db = store.get(name)
    except NotFoundError:
        return 0
    return db.pos.txid if db is not None else 0


class NodeProxyState:
    """The proxy's view of the node (`litefspy.proxy.ProxyState`)."""

    def __init__(self, node: NodeView, waiters: TxidWaiters) -> None:
        self.node = node
        self.waiters = waiters
        # The primary's proxy listens on the same port as ours (one fuse.yml per cluster).
        self.proxy_port = split_host_port(node.config.proxy.addr)[1]

    def is_primary(self) -> bool:
        return self.node.is_primary()

    def primary_hostname(self) -> str | None:
        return self.node.primary_hostname()

    def primary_proxy_url(self) -> str | None:
        host = self.node.primary_hostname()
        if not host:
            return None
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.proxy_port}"

    def no_primary_reason(self) -> str:
        trouble = self.node.lease_trouble()
        if trouble:
            return f"lease unreachable: {trouble}"
        lease = self.node.config.lease
        if lease.type == "static":
            return f"not connected to the static primary at {lease.advertise_url}"
        return "no node holds the lease right now"

    def txid(self, db: str) -> int:
        return local_txid(self.node.store, db)

    async def wait_for_txid(self, db: str, txid: int) -> None:
        await self.waiters.wait_for_txid(db, txid)

    def lag_seconds(self) -> float:
        return self.node.lag_ms() / 1000.0

    def readiness(self) -> tuple[bool, str]:
        return self.node.readiness()


@dataclass
class _LtxCount:
    files: int = 0
    bytes: int = 0


def count_ltx(db: Database) -> _LtxCount:
    """Number and total size of a database's LTX files (worker thread)."""
    count = _LtxCount()
    for _, _, path in db.ltx_files():
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            continue  # removed by retention meanwhile
        count.files += 1
        count.bytes += size
    return count


class NodeMetricsSource:
    """The metrics' view of the node (`litefspy.metrics.NodeMetricsSource`).

    Subscribe `on_commit` to the store and run `run_recount` in the node's
    nursery.
    """

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.commits: dict[str, int] = {}
        self._ltx: dict[str, _LtxCount] = {}
        # Replicas seen since start: one that went away shows as not connected.
        self._replicas_seen: set[str] = set()

    def on_commit(self, info: CommitInfo) -> None:
        """Store listener: count the commit and its LTX file (cheap, any thread)."""
        self.commits[info.name] = self.commits.get(info.name, 0) + 1
        count = self._ltx.setdefault(info.name, _LtxCount())
        count.files += 1
        count.bytes += info.size

    async def recount(self) -> None:
        """Recount every database's LTX files from disk, off the trio thread."""
        fresh: dict[str, _LtxCount] = {}
        for db in self.node.store.databases():
            fresh[db.name] = await trio.to_thread.run_sync(count_ltx, db)
        self._ltx = fresh

    async def run_recount(self, interval: float = LTX_RECOUNT_INTERVAL) -> None:
        """Background task: recount now, then every `interval` seconds."""
        while True:
            try:
                await self.recount()
            except OSError as exc:
                log.warning("could not count LTX files for metrics %s", kv(error=exc))
            await trio.sleep(interval)

    # ------------------------------------------------ NodeMetricsSource

    def databases(self) -> Sequence[DbStats]:
        node = self.node
        lag = node.lag_ms() / 1000.0
        replicas = node.replica_count() if node.is_primary() else 0
        out = []
        for db in node.store.databases():
            ltx = self._ltx.get(db.name, _LtxCount())
            out.append(
                DbStats(
                    name=db.name,
                    txid=db.pos.txid,
                    commits=self.commits.get(db.name, 0),
                    ltx_files=ltx.files,
                    ltx_bytes=ltx.bytes,
                    lag_seconds=lag,
                    replicas=replicas,
                )
            )
        return out

    def role_is_primary(self) -> bool:
        return self.node.is_primary()

    def lease_epoch(self) -> int:
        return self.node.lease_epoch()

    def backup_report(self) -> dict[str, Any] | None:
        return self.node.backup_report()

    def stream_count(self) -> int:
        return self.node.stream_count()

    def fuse_request_counts(self) -> Mapping[str, int]:
        return dict(self.node.ops.request_counts)

    def lag_seconds(self) -> float:
        return self.node.lag_ms() / 1000.0

    def ready(self) -> bool:
        return self.node.readiness()[0]

    def replication(self) -> ReplicationStats:
        stats = self.node.replication_stats()
        connected = {link.hostname for link in stats.replicas}
        self._replicas_seen |= connected
        links = [ReplicaLink(h, h in connected) for h in sorted(self._replicas_seen)]
        return replace(stats, replicas=links)
