"""Services a node runs around its core (proxy, metrics, data RPCs, events, exec).

`node.py` owns the core (store, mount, leases, replication) and hands itself to
`serve_extras` as a `NodeView`; everything here depends only on that protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from litefspy.config import Config
from litefspy.fuse.ops import Operations
from litefspy.replication.bridge import GRPCServer
from litefspy.store.store import Store


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

    def lag_ms(self) -> int:
        """Milliseconds since the last data or heartbeat from the primary (0 on the primary)."""

    def lease_epoch(self) -> int:
        """The fencing epoch of the current lease (0 if none)."""

    def stream_count(self) -> int:
        """Replication streams open right now (served, or 1 while a replica is connected)."""

    def replica_count(self) -> int:
        """Replicas connected to this node (0 on a replica)."""

    def on_role_change(self, callback: Callable[[str], None]) -> None:
        """Call `callback(role)` ("primary" | "replica" | "candidate-waiting") on every change."""


def register_rpcs(node: NodeView, server: GRPCServer) -> None:
    """Add the services' RPCs to the node's gRPC server (called before it serves)."""
    del node, server


async def serve_extras(
    node: NodeView, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the optional services (proxy, metrics, ...) until cancelled."""
    del node
    task_status.started()
    await trio.sleep_forever()
