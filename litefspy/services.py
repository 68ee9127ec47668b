"""Services a node runs around its core (proxy, metrics, data RPCs, events, exec).

`node.py` owns the core (store, mount, leases, replication) and hands itself to
`serve_extras` as a `NodeView`; everything here depends only on that protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from litefspy.config import Config
from litefspy.errors import LitefspyError
from litefspy.fuse.ops import Operations
from litefspy.metrics import ReplicationStats
from litefspy.replication.bridge import GRPCServer
from litefspy.store.store import Store

if TYPE_CHECKING:
    from litefspy.backup.uploader import BackupProgress


class NodeView(Protocol):
    """What the services may know about and ask of the node."""

    config: Config
    store: Store
    ops: Operations

    def is_primary(self) -> bool:
        """This node holds the primary lease (or the static primary role) right now."""

    def primary_hostname(self) -> str | None:
        """The current primary's hostname (this node's own when primary); None if unknown."""

    def primary_advertise_url(self) -> str | None:
        """The current primary's advertise URL (gRPC); None if unknown."""

    def lease_trouble(self) -> str | None:
        """Why the lease engine cannot be reached right now; None while it answers."""

    def lag_ms(self) -> int:
        """Milliseconds since the last data or heartbeat from the primary (0 on the primary)."""

    def lease_epoch(self) -> int:
        """The fencing epoch of the current lease (0 if none)."""

    def stream_count(self) -> int:
        """Replication streams open right now (served, or 1 while a replica is connected)."""

    def replica_count(self) -> int:
        """Replicas connected to this node (0 on a replica)."""

    def backup_report(self) -> dict[str, Any] | None:
        """The backup's state (litefspy.backup.runner.BackupRunner.report); None if off."""

    def on_backup_event(self, callback: Callable[[BackupProgress], None]) -> None:
        """Call `callback(progress)` for each backup upload and new error (none if it is off)."""

    def on_role_change(self, callback: Callable[[str], None]) -> None:
        """Call `callback(role)` ("primary" | "replica" | "candidate-waiting") on every change."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): a primary with the lease, or a replica caught up once."""

    def replication_stats(self) -> ReplicationStats:
        """Replication counters of both sides since start (metrics)."""


def register_rpcs(node: NodeView, server: GRPCServer) -> None:
    """Add the services' RPCs to the node's gRPC server (called before it serves).

    `Data.Import` / `Data.Export` (litefspy.dataservice), `Data.Events`
    (litefspy.events, which subscribes to the store and the role changes here)
    and the `Halt` service of write forwarding (litefspy.halt).
    """
    from litefspy.dataservice import DataService
    from litefspy.events import EventHub
    from litefspy.halt import HaltService

    DataService(node).register(server)
    EventHub(node).register(server)
    HaltService(node).register(server)


async def serve_extras(
    node: NodeView, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the optional services (proxy, metrics) until cancelled.

    `task_status.started()` is reported once every enabled listener is bound; a
    bad `proxy.*` / `metrics.addr` or a port in use raises (ConfigError /
    ListenError) before that, so the node fails to start with that message.
    """
    from litefspy.adapters import NodeMetricsSource, NodeProxyState, local_txid
    from litefspy.metrics import Metrics
    from litefspy.proxy import TxidWaiters, serve_proxy

    config = node.config
    store = node.store
    unsubscribe: list[Callable[[], None]] = []
    failed: LitefspyError | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                metrics: Metrics | None = None
                if config.metrics.enabled:
                    source = NodeMetricsSource(node)
                    unsubscribe.append(store.feed.subscribe(source.on_commit))
                    metrics = Metrics(source)
                    await nursery.start(partial(metrics.serve, config.metrics.addr))
                    node.ops.enable_timing(metrics.observe_fuse)
                    nursery.start_soon(source.run_recount)
                if config.proxy.enabled:
                    waiters = TxidWaiters(lambda db: local_txid(store, db))
                    unsubscribe.append(store.feed.subscribe(waiters.notify))
                    state = NodeProxyState(node, waiters)
                    observe = metrics.observe_proxy if metrics is not None else None
                    await nursery.start(partial(serve_proxy, config.proxy, state, observe=observe))
            except LitefspyError as exc:
                # Raised unwrapped (not in an ExceptionGroup) so the node can print it.
                failed = exc
                nursery.cancel_scope.cancel()
            else:
                task_status.started()
                await trio.sleep_forever()
    finally:
        for stop in unsubscribe:
            stop()
    if failed is not None:
        raise failed


async def run_exec(
    node: NodeView, signals: AsyncIterator[int], *, command: Sequence[str] | None = None
) -> int:
    """Run `exec:` (or `mount -- CMD` as `command`) once the node is ready; its exit status.

    See `litefspy.supervisor.run_exec`; `signals` is the node's SIGINT/SIGTERM
    receiver, which this consumes until it returns.
    """
    from litefspy import supervisor

    return await supervisor.run_exec(node, signals, command=command)
