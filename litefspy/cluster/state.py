"""`NodeState`: this node's role, with one `changed` event for everything that waits on it.

The role loop (`litefspy.cluster.roles`) is the only writer of the role; the
handoff (`litefspy.cluster.handoff`) hands it a token through `offer`, which
wakes the loop. Waiters await `changed` (or `wait_until`) instead of keeping
their own flags.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from litefspy.lease.base import HandoffToken
from litefspy.logs import kv
from litefspy.replication.client import ReplicationClient
from litefspy.replication.server import ReplicationServer
from litefspy.store.types import Position

log = logging.getLogger(__name__)

PRIMARY = "primary"
REPLICA = "replica"
WAITING = "candidate-waiting"


@dataclass
class PendingHandoff:
    """A handoff token this node received (Handoff frame or Handoff reply)."""

    token: HandoffToken
    positions: dict[str, Position]
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


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
    # (ready, why not): see Cluster.readiness.
    ready: tuple[bool, str] = (True, "")


class NodeState:
    """The role (`primary`, `replica`, `candidate-waiting`) and the handoff offered to it."""

    def __init__(self, role: str, node_id: str) -> None:
        self.role = role
        self.node_id = node_id
        # Set (and replaced) on every role change.
        self.changed = trio.Event()
        # Set to make the role loop look again now (a handoff token arrived).
        self.wake = trio.Event()
        self.pending: PendingHandoff | None = None
        self._callbacks: list[Callable[[str], None]] = []

    def on_role_change(self, callback: Callable[[str], None]) -> None:
        """Call `callback(role)` on every role change (on the trio thread)."""
        self._callbacks.append(callback)

    def set_role(self, role: str) -> None:
        """Publish a new role: log it, set `changed`, run the callbacks."""
        if role == self.role:
            return
        log.info("role changed %s", kv(old=self.role, new=role, node=self.node_id))
        self.role = role
        self.changed.set()
        self.changed = trio.Event()
        for callback in list(self._callbacks):
            try:
                callback(role)
            except Exception:
                log.exception("role change callback failed %s", kv(role=role))

    async def wait_until(self, predicate: Callable[[], bool], poll: float = 0.02) -> None:
        """Return once `predicate()` holds: checked on role changes and every `poll` s.

        The poll covers what publishes no event (a replica's apply position).
        """
        while not predicate():
            changed = self.changed
            with trio.move_on_after(poll):
                await changed.wait()

    def offer(self, pending: PendingHandoff) -> None:
        """Hand the role loop a handoff to adopt, and wake it."""
        self.pending = pending
        self.wake.set()

    def take_pending(self) -> PendingHandoff | None:
        """The offered handoff, if any (the role loop takes it once)."""
        pending, self.pending = self.pending, None
        return pending

    def clear_wake(self) -> None:
        """Re-arm `wake` once the role loop has looked."""
        if self.wake.is_set():
            self.wake = trio.Event()
