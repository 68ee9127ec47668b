"""Prometheus metrics on `metrics.addr` (`GET /metrics`), with prometheus-client.

Nearly everything is read at scrape time from a `NodeMetricsSource` the node
implements, through a custom collector: the hot paths (FUSE handlers, commit
capture) keep the counters they already keep (`Operations.request_counts`, the
store's positions) and pay nothing for metrics. The one thing observed as it
happens is FUSE request latency, `Metrics.observe_fuse(op, seconds)`: a dict
lookup and one histogram observe.

Each `Metrics` has its own `CollectorRegistry` (never prometheus-client's
global one), so several nodes in one process or test do not collide. The HTTP
side reuses the proxy's h11-on-trio server, so it is cancellable like any trio
task and needs no thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from litefspy.http.connection import ClientGone, HTTPConnection
from litefspy.http.server import serve_http
from litefspy.http.target import request_path
from litefspy.logs import kv

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# FUSE requests take tens of microseconds (cached) to tens of milliseconds (fsync).
FUSE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

# Proxied requests: the app's own latency, from a millisecond to long polls.
PROXY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class DbStats:
    """One database's numbers at scrape time."""

    name: str
    txid: int
    commits: int  # transactions committed or applied on this node since start
    ltx_files: int
    ltx_bytes: int
    lag_seconds: float
    replicas: int  # replicas streaming this database (0 on a replica)


@dataclass(frozen=True)
class ReplicaLink:
    """A replica as the primary sees it (connected now, or seen since start)."""

    hostname: str
    connected: bool


@dataclass(frozen=True)
class ReplicationStats:
    """Both sides of replication, counted since the node started."""

    # Primary side (every term as primary added up).
    files_sent: int = 0
    snapshots_sent: int = 0
    bytes_sent: int = 0
    send_errors: int = 0
    replicas: Sequence[ReplicaLink] = ()
    # Replica side.
    connected_to_primary: bool = False
    files_applied: int = 0
    snapshots_applied: int = 0
    bytes_received: int = 0
    receive_errors: int = 0


class NodeMetricsSource(Protocol):
    """What the node provides. Called on the trio thread at each scrape: every
    method must be cheap and must not block (no directory walks; keep counts)."""

    def databases(self) -> Sequence[DbStats]: ...

    def role_is_primary(self) -> bool: ...

    def lease_epoch(self) -> int: ...

    def stream_count(self) -> int: ...

    def fuse_request_counts(self) -> Mapping[str, int]: ...

    def backup_report(self) -> Mapping[str, Any] | None: ...

    def lag_seconds(self) -> float: ...

    def ready(self) -> bool: ...

    def replication(self) -> ReplicationStats: ...


class NodeCollector(Collector):
    """Builds the gauges and counters from the source at scrape time."""

    def __init__(self, source: NodeMetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        source = self.source
        per_db: list[tuple[str, str, type[GaugeMetricFamily] | type[CounterMetricFamily]]] = [
            ("litefspy_db_txid", "Current TXID of the database on this node.", GaugeMetricFamily),
            (
                "litefspy_db_commits",
                "Transactions committed (primary) or applied (replica) since start.",
                CounterMetricFamily,
            ),
            ("litefspy_db_ltx_files", "LTX files kept for the database.", GaugeMetricFamily),
            (
                "litefspy_db_ltx_bytes",
                "Bytes of LTX files kept for the database.",
                GaugeMetricFamily,
            ),
            (
                "litefspy_db_lag_seconds",
                "Seconds since this node last heard from the primary about the database.",
                GaugeMetricFamily,
            ),
            (
                "litefspy_db_replicas",
                "Replicas currently streaming the database from this node.",
                GaugeMetricFamily,
            ),
        ]
        families = {name: kind(name, doc, labels=["db"]) for name, doc, kind in per_db}
        for db in source.databases():
            values = {
                "litefspy_db_txid": db.txid,
                "litefspy_db_commits": db.commits,
                "litefspy_db_ltx_files": db.ltx_files,
                "litefspy_db_ltx_bytes": db.ltx_bytes,
                "litefspy_db_lag_seconds": db.lag_seconds,
                "litefspy_db_replicas": db.replicas,
            }
            for name, value in values.items():
                families[name].add_metric([db.name], float(value))
        yield from families.values()
        yield GaugeMetricFamily(
            "litefspy_node_role",
            "1 while this node is the primary, 0 while it is a replica.",
            value=1.0 if source.role_is_primary() else 0.0,
        )
        yield GaugeMetricFamily(
            "litefspy_lease_epoch",
            "Epoch (fencing token) of the primary lease this node follows or holds.",
            value=float(source.lease_epoch()),
        )
        yield GaugeMetricFamily(
            "litefspy_streams",
            "Replication streams open on this node (served or followed).",
            value=float(source.stream_count()),
        )
        requests = CounterMetricFamily(
            "litefspy_fuse_requests", "FUSE requests handled, by operation.", labels=["op"]
        )
        for op, count in sorted(source.fuse_request_counts().items()):
            requests.add_metric([op], float(count))
        yield requests
        yield GaugeMetricFamily(
            "litefspy_lag_seconds",
            "Seconds since this node last heard from the primary (0 on the primary); "
            "counts from start until a replica first connects.",
            value=source.lag_seconds(),
        )
        yield GaugeMetricFamily(
            "litefspy_ready",
            "1 once the node can serve (primary with the lease, or replica caught up once).",
            value=1.0 if source.ready() else 0.0,
        )
        yield from _replication_metrics(source.replication())
        backup = source.backup_report()
        if backup is not None:
            yield from _backup_metrics(backup)


def _replication_metrics(r: ReplicationStats) -> Iterable[Metric]:
    counters = [
        ("litefspy_replication_files_sent", "LTX files sent to replicas.", r.files_sent),
        (
            "litefspy_replication_snapshots_sent",
            "Snapshots (whole databases) sent to replicas.",
            r.snapshots_sent,
        ),
        ("litefspy_replication_bytes_sent", "LTX bytes sent to replicas.", r.bytes_sent),
        (
            "litefspy_replication_files_applied",
            "LTX files received from the primary and applied.",
            r.files_applied,
        ),
        (
            "litefspy_replication_snapshots_applied",
            "Snapshots received from the primary and applied.",
            r.snapshots_applied,
        ),
        (
            "litefspy_replication_bytes_received",
            "LTX bytes received from the primary.",
            r.bytes_received,
        ),
    ]
    for name, doc, value in counters:
        yield CounterMetricFamily(name, doc, value=float(value))
    errors = CounterMetricFamily(
        "litefspy_replication_errors",
        "Replication failures: side=send (primary: snapshot not built, stream failed), "
        "side=receive (replica: stream dropped, apply failed).",
        labels=["side"],
    )
    errors.add_metric(["send"], float(r.send_errors))
    errors.add_metric(["receive"], float(r.receive_errors))
    yield errors
    replicas = GaugeMetricFamily(
        "litefspy_replica_connected",
        "Primary: 1 while the replica streams from this node, 0 once it went away.",
        labels=["replica"],
    )
    for link in sorted(r.replicas, key=lambda x: x.hostname):
        replicas.add_metric([link.hostname], 1.0 if link.connected else 0.0)
    yield replicas
    yield GaugeMetricFamily(
        "litefspy_primary_connected",
        "Replica: 1 while connected to the primary.",
        value=1.0 if r.connected_to_primary else 0.0,
    )


def _backup_metrics(report: Mapping[str, Any]) -> Iterable[Metric]:
    """Backup families (backup.url set): per database while uploading, totals always."""
    uploaded = GaugeMetricFamily(
        "litefspy_backup_uploaded_txid", "Newest TXID durable in the backup.", labels=["db"]
    )
    lag = GaugeMetricFamily(
        "litefspy_backup_lag_seconds",
        "How long the oldest transaction not in the backup yet has waited.",
        labels=["db"],
    )
    behind = GaugeMetricFamily(
        "litefspy_backup_lag_txids", "Transactions not in the backup yet.", labels=["db"]
    )
    for name, d in sorted(report["databases"].items()):
        uploaded.add_metric([name], float(int(d["uploaded_txid"], 16)))
        lag.add_metric([name], d["lag_ms"] / 1000.0)
        behind.add_metric([name], float(d["lag_txids"]))
    yield from (uploaded, lag, behind)
    yield CounterMetricFamily(
        "litefspy_backup_bytes_uploaded",
        "Bytes uploaded to the backup.",
        value=float(report["bytes_uploaded"]),
    )
    yield CounterMetricFamily(
        "litefspy_backup_objects_uploaded",
        "Objects uploaded to the backup.",
        value=float(report["objects_uploaded"]),
    )
    yield CounterMetricFamily(
        "litefspy_backup_errors",
        "Failed backup uploads, compactions and expiries.",
        value=float(report["errors"]),
    )
    yield GaugeMetricFamily(
        "litefspy_backup_last_compaction_timestamp_seconds",
        "When the backup was last compacted (0: not yet).",
        value=report["last_compaction_ms"] / 1000.0,
    )


class Metrics:
    """The node's metrics: a private registry, the FUSE latency histogram, `/metrics`.

    The registry also holds prometheus-client's process collector
    (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
    `process_open_fds`, ...) and the proxy's request histogram.
    """

    def __init__(self, source: NodeMetricsSource, *, buckets: Sequence[float] = FUSE_BUCKETS):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(source))
        ProcessCollector(registry=self.registry)
        self._proxy_seconds = Histogram(
            "litefspy_proxy_request_seconds",
            "Proxy requests by route (read, write, health, passthrough) and outcome "
            "(ok, replay, forwarded, client-error, error, dropped): count and latency.",
            ["route", "outcome"],
            registry=self.registry,
            buckets=PROXY_BUCKETS,
        )
        self._fuse_seconds = Histogram(
            "litefspy_fuse_request_seconds",
            "FUSE request latency, by operation.",
            ["op"],
            registry=self.registry,
            buckets=buckets,
        )
        self._fuse_children: dict[str, Histogram] = {}

    def observe_fuse(self, op: str, seconds: float) -> None:
        """Record one FUSE request's duration (hot path: dict lookup + observe)."""
        child = self._fuse_children.get(op)
        if child is None:
            child = self._fuse_children[op] = self._fuse_seconds.labels(op=op)
        child.observe(seconds)

    def observe_proxy(self, route: str, outcome: str, seconds: float) -> None:
        """Record one proxied request (from its start to the end of the response)."""
        self._proxy_seconds.labels(route=route, outcome=outcome).observe(seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text for an `Accept` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def serve(
        self, addr: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve `GET /metrics` on `addr` (`:20203` = all interfaces) until cancelled.

        `task_status.started()` receives the bound port. Raises ConfigError for
        a malformed address and ListenError when it cannot be bound.
        """
        await serve_http(addr, "metrics.addr", self._handle_connection, task_status=task_status)

    async def _handle_connection(self, conn: HTTPConnection) -> None:
        try:
            while (request := await conn.next_request()) is not None:
                await self._handle_request(conn, request.method, request.target, request.headers)
                if not await conn.finish_cycle():
                    return
        except ClientGone:
            return

    async def _handle_request(
        self,
        conn: HTTPConnection,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
    ) -> None:
        if method not in (b"GET", b"HEAD"):
            await conn.respond(
                405, b"method not allowed: use GET /metrics\n", headers=[(b"allow", b"GET, HEAD")]
            )
            return
        if request_path(target) != METRICS_PATH:
            await conn.respond(404, b"not found: metrics are at /metrics\n")
            return
        accept = ", ".join(v.decode("latin-1") for k, v in headers if k == b"accept")
        try:
            body, content_type = self.render(accept)
        except Exception as exc:
            log.exception("metrics scrape failed %s", kv(error=exc))
            await conn.respond(500, b"metrics error: collecting failed (see the node's log)\n")
            return
        await conn.respond(200, body, content_type=content_type.encode())
