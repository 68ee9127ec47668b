"""`NodeView`: what the services around the core may know about and ask of the node.

The Data, Events and Halt RPC handlers (`litefspy.api`), the command runner
(`litefspy.supervisor`) and the proxy/metrics adapters
(`litefspy.cluster.adapters`) depend on this protocol only; `litefspy.node.Node`
implements it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from litefspy.config import Config
from litefspy.fuse.ops import Operations
from litefspy.metrics import ReplicationStats
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
