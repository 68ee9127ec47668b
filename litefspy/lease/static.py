"""Static lease: one configured primary, no failover (fuse.yml `lease.type: static`).

The node configured with `lease.candidate: true` is always the primary, at
epoch 1, with a lease that never expires; every other node always sees that
primary. There is no engine to lose contact with, so nothing here ever fails
for transport reasons, and the role never changes (`watch` sleeps forever).
The cluster id lives in memory only: the node persists it in its data dir.
"""

from __future__ import annotations

import builtins
import logging
import math
from types import TracebackType

import trio

from litefspy.errors import LeaseError
from litefspy.lease.base import HandoffToken, LeaseState, PrimaryInfo
from litefspy.logs import kv

log = logging.getLogger(__name__)

STATIC_EPOCH = 1


class StaticLease:
    """The never-expiring primary role of the configured static primary."""

    def __init__(self, primary: PrimaryInfo) -> None:
        self._primary = primary
        self._lost = trio.Event()
        self._lost_reason: str | None = None

    @property
    def primary(self) -> PrimaryInfo:
        """This node."""
        return self._primary

    @property
    def epoch(self) -> int:
        """Always 1: there is only ever one holder."""
        return STATIC_EPOCH

    @property
    def ttl(self) -> float:
        """Infinite: a static lease needs no renewal."""
        return math.inf

    @property
    def lost(self) -> trio.Event:
        """Set only by `release()`."""
        return self._lost

    @property
    def lost_reason(self) -> str | None:
        """Why the lease ended, None while held."""
        return self._lost_reason

    def deadline(self) -> float:
        """Infinite while held; -inf after release, so checks fail closed."""
        return -math.inf if self._lost.is_set() else math.inf

    async def run(self) -> None:
        """Nothing to renew: wait until released."""
        await self._lost.wait()

    async def release(self) -> None:
        """Mark the role given up (the configured primary comes back on restart)."""
        if not self._lost.is_set():
            self._lost_reason = "released"
            self._lost.set()
            log.info("static lease released %s", kv(node=self._primary.node_id))

    async def handoff(self, target: PrimaryInfo) -> HandoffToken:
        """Always refused: the primary is fixed by configuration."""
        raise LeaseError(
            f"cannot hand the primary role to {target.hostname}: lease.type is static, "
            "the primary is fixed by configuration (use lease.type: etcd for handoff)"
        )


class StaticLeaser:
    """`Leaser` for a fixed primary. `is_primary` says whether this node is it."""

    def __init__(self, primary: PrimaryInfo, is_primary: bool) -> None:
        self._primary = primary
        self._is_primary = is_primary
        self._cluster_id: str | None = None

    @property
    def type(self) -> str:
        """`static`."""
        return "static"

    @property
    def fixed_primary(self) -> bool:
        """True: the configured candidate is the primary."""
        return True

    async def acquire(self, me: PrimaryInfo) -> StaticLease | None:
        """The configured primary always gets the role; everyone else gets None."""
        await trio.lowlevel.checkpoint()
        if not self._is_primary:
            return None
        return StaticLease(me)

    async def adopt(self, token: HandoffToken, me: PrimaryInfo) -> StaticLease:
        """Always refused: static leases are never handed off."""
        await trio.lowlevel.checkpoint()
        raise LeaseError(
            f"cannot adopt a handed-off lease on {me.hostname}: lease.type is static "
            "(use lease.type: etcd for handoff)"
        )

    async def current(self) -> LeaseState:
        """Always the configured primary at epoch 1."""
        await trio.lowlevel.checkpoint()
        return LeaseState(primary=self._primary, epoch=STATIC_EPOCH, revision=STATIC_EPOCH)

    async def watch(self, after_revision: int) -> LeaseState:
        """Never returns: the static primary never changes (cancel it to stop)."""
        await trio.sleep_forever()

    async def cluster_id(self) -> str | None:
        """The in-memory cluster id, None until set."""
        await trio.lowlevel.checkpoint()
        return self._cluster_id

    async def set_cluster_id(self, cluster_id: str) -> str:
        """Set the in-memory cluster id if absent; return the stored one."""
        await trio.lowlevel.checkpoint()
        if self._cluster_id is None:
            self._cluster_id = cluster_id
        return self._cluster_id

    async def aclose(self) -> None:
        """Nothing to close."""
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> StaticLeaser:
        return self

    async def __aexit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
