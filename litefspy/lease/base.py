"""Lease protocols and value types: who is primary, and for how long.

A *leaser* is this node's handle on the coordination engine (``static`` or
``etcd``); a *lease* is the primary role this node currently holds through it.
The role loop (``cluster/roles.py``) is written against these protocols only;
``node.py`` builds the concrete leaser.

Lifecycle on a candidate::

    lease = await leaser.acquire(me)          # None: someone else is primary
    if lease is not None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lease.run)     # renews; sets lease.lost on trouble
            ...act as primary, but only while trio.current_time() < lease.deadline()
            await lease.lost.wait()           # then demote at once
    else:
        state = await leaser.current()        # replicate from state.primary
        state = await leaser.watch(state.revision)   # wakes when the key changes

Rules the role loop can rely on:

* ``Lease.deadline()`` is the trio clock time after which the holder MUST NOT
  act as primary. It is the send time of the last renewal that etcd confirmed
  plus the TTL minus a safety margin, so it is never later than etcd's own
  expiry even if a renewal hangs; it is -inf once the lease is lost, so the
  single check ``trio.current_time() < lease.deadline()`` fails closed.
* ``Lease.lost`` is set (once, and never cleared) as soon as the lease stops
  being valid for any reason: a renewal is refused, the key was deleted or
  re-pointed, the deadline passed without a confirmed renewal, ``release()``
  or ``handoff()``. ``lost_reason`` says which. ``run()`` maintains it and
  returns when it is set; ``run()`` never raises for transport errors.
* ``epoch`` is a fencing token that only grows across holders (for etcd, the
  key's ``mod_revision`` when this holder wrote it). A replica remembers the
  highest epoch it has seen and refuses a stream from a lower one.
* ``release()`` revokes the lease so a successor can take over at once.
  ``handoff(target)`` re-points the key at ``target`` keeping the same etcd
  lease and returns a ``HandoffToken`` that the target passes to
  ``Leaser.adopt`` (the token travels in the replication stream as JSON).
* ``LeaseState.revision`` is the point in the engine's history at which the
  state was read; pass it to ``watch`` to wait for the next change. ``watch``
  may return a state equal to the previous one (e.g. after etcd compacted its
  history): callers always re-evaluate the returned state.
* Every failure to talk to the engine is a ``litefspy.errors.LeaseError`` with
  a one-line message naming the endpoint; nothing else escapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import trio

from litefspy.errors import LeaseError


def _fields_from_json(text: str | bytes, what: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Parse a JSON object and check it has exactly the expected keys."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise LeaseError(f"invalid {what}: not JSON ({e})") from e
    if not isinstance(obj, dict):
        raise LeaseError(f"invalid {what}: expected a JSON object, got {type(obj).__name__}")
    missing = [n for n in names if n not in obj]
    if missing:
        raise LeaseError(f"invalid {what}: missing {', '.join(missing)}")
    return obj


@dataclass(frozen=True)
class PrimaryInfo:
    """Who the primary is: stored as the lease key's value, shown in `.primary`/status."""

    hostname: str
    advertise_url: str
    node_id: str

    def to_json(self) -> str:
        """Serialise as a compact JSON object (the etcd key's value)."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PrimaryInfo:
        """Parse `to_json` output; raises LeaseError on anything else."""
        names = ("hostname", "advertise_url", "node_id")
        obj = _fields_from_json(text, "primary record", names)
        if not all(isinstance(obj[n], str) for n in names):
            raise LeaseError(
                "invalid primary record: hostname, advertise_url, node_id must be strings"
            )
        return cls(
            hostname=obj["hostname"], advertise_url=obj["advertise_url"], node_id=obj["node_id"]
        )


@dataclass(frozen=True)
class LeaseState:
    """What the engine says about the primary role at one point in its history.

    `primary` is None when nobody holds the lease. `epoch` is the fencing epoch
    of the current holder (0 when nobody holds it). `revision` is the engine's
    revision at which this was read: pass it to `Leaser.watch`.
    """

    primary: PrimaryInfo | None
    epoch: int
    revision: int


@dataclass(frozen=True)
class HandoffToken:
    """What a handoff target needs to take over the primary's lease.

    `lease_id` is the engine's lease (kept across the handoff, so there is no
    gap in which nobody holds the key); `epoch` is the new fencing epoch, at
    which the key names `primary` (the target).
    """

    lease_id: int
    epoch: int
    primary: PrimaryInfo

    def to_json(self) -> str:
        """Serialise for the replication stream's handoff frame."""
        return json.dumps(
            {"lease_id": self.lease_id, "epoch": self.epoch, "primary": asdict(self.primary)},
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> HandoffToken:
        """Parse `to_json` output; raises LeaseError on anything else."""
        obj = _fields_from_json(text, "handoff token", ("lease_id", "epoch", "primary"))
        if not isinstance(obj["lease_id"], int) or not isinstance(obj["epoch"], int):
            raise LeaseError("invalid handoff token: lease_id and epoch must be integers")
        primary = PrimaryInfo.from_json(json.dumps(obj["primary"]))
        return cls(lease_id=obj["lease_id"], epoch=obj["epoch"], primary=primary)


class Lease(Protocol):
    """The primary role held by this node (see the module docstring for the rules)."""

    @property
    def primary(self) -> PrimaryInfo:
        """This node, as the key names it."""
        ...

    @property
    def epoch(self) -> int:
        """Fencing epoch: grows with every new holder (and every handoff)."""
        ...

    @property
    def ttl(self) -> float:
        """Seconds a renewal keeps the lease alive (inf for static)."""
        ...

    @property
    def lost(self) -> trio.Event:
        """Set once the lease is no longer valid, for any reason; never cleared."""
        ...

    @property
    def lost_reason(self) -> str | None:
        """Why `lost` was set (for logs and status), None while valid."""
        ...

    def deadline(self) -> float:
        """`trio.current_time()` after which this node must not act as primary (-inf once lost)."""
        ...

    async def run(self) -> None:
        """Renew until lost, released or handed off; returns then. Never raises LeaseError."""
        ...

    async def release(self) -> None:
        """Give the role up so a successor can take over at once (graceful shutdown).

        Sets `lost` first, then tells the engine (also when the lease was
        already lost, in case the engine still holds it; never after a
        handoff, whose target now owns it). Raises LeaseError if the engine
        could not be told; the lease then simply expires after its TTL.
        """
        ...

    async def handoff(self, target: PrimaryInfo) -> HandoffToken:
        """Atomically re-point the role at `target`, keeping the lease alive.

        Sets `lost` on success: this node is no longer primary. Raises
        LeaseError if the role is already lost or the engine refused; if the
        outcome is unknown (a timeout), `lost` is set too, so the node never
        keeps acting as primary while the key may name someone else.
        """
        ...


class Leaser(Protocol):
    """This node's handle on the lease engine."""

    @property
    def type(self) -> str:
        """`static` or `etcd` (as in fuse.yml's `lease.type`)."""
        ...

    @property
    def fixed_primary(self) -> bool:
        """The configuration names the primary: the candidate always gets the lease,
        nobody is elected (no holder to show) and the lease cannot be handed off."""
        ...

    async def acquire(self, me: PrimaryInfo) -> Lease | None:
        """Take the primary role if nobody holds it; None if someone else does."""
        ...

    async def adopt(self, token: HandoffToken, me: PrimaryInfo) -> Lease:
        """Target side of a handoff: take over the lease named by `token`.

        Renews it at once and checks that the key names `me` at `token.epoch`;
        raises LeaseError otherwise.
        """
        ...

    async def current(self) -> LeaseState:
        """Read who is primary now."""
        ...

    async def watch(self, after_revision: int) -> LeaseState:
        """Wait until the role changes after `after_revision`; return the new state.

        Cancellable. Raises LeaseError when the engine cannot be reached.
        """
        ...

    async def cluster_id(self) -> str | None:
        """The cluster id stored with the lease, None if none was set yet."""
        ...

    async def set_cluster_id(self, cluster_id: str) -> str:
        """Store `cluster_id` unless one is already stored; return the stored one."""
        ...

    async def aclose(self) -> None:
        """Release connections (does not release a held lease)."""
        ...
