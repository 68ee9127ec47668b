"""etcd lease (fuse.yml `lease.type: etcd`): a key bound to an etcd lease with a TTL.

Keys (under the configured `lease.etcd.key`, e.g. `myapp/primary`):

* `<key>`: the primary record (`PrimaryInfo.to_json()`), attached to the
  holder's etcd lease so etcd deletes it when the lease expires or is revoked;
* `<key>/cluster-id`: the cluster id, a plain key (no lease) written once with
  a create-if-absent txn. It sits under the lease key so one `lease.etcd.key`
  names everything a cluster stores in etcd.

Protocol (all over the v3 JSON gateway, see `etcd_gateway`):

* acquire: `lease/grant` (TTL rounded up to whole seconds, as etcd wants),
  then one txn `create_revision(key) == 0 -> put key=me with that lease`; if
  the txn fails the granted lease is revoked. The epoch is the key's
  `mod_revision` after our put (the txn's header revision), which only grows.
* renew (`EtcdLease.run`): every ttl/3, `lease/keepalive` (TTL <= 0 in the
  answer means etcd already dropped the lease), then a `kv/range` to check
  the key is still ours at our epoch (nobody deleted or re-pointed it). The
  deadline becomes send-time-of-the-keepalive + min(ttl, granted TTL) -
  margin: etcd measures the TTL from when it receives the keepalive, which is
  later, so the holder always demotes before etcd can hand the key to anyone.
  A watchdog sets `lost` at the deadline whatever the renewal requests are
  doing, so a hanging etcd cannot keep a stale primary alive.
* handoff: one txn `mod_revision(key) == epoch -> put key=target with the same
  lease`; the target's `adopt` renews that lease and checks the key. The old
  holder stops renewing at once, so the target must adopt within what is left
  of the TTL (at least ttl*2/3 minus the handoff's own latency); if it never
  does, etcd expires the key and the cluster elects as after a crash.
* release: `lease/revoke` (etcd deletes the key at once). A node that dies
  without releasing cannot reclaim its old lease after a restart: everyone,
  itself included, waits for the TTL to run out.
* watch: the streaming `/v3/watch` from `after_revision + 1`. Streaming gives
  a wake-up within milliseconds of a release or an expiry, where polling
  would add up to a poll interval to every failover. To survive a stream that
  silently stops (a paused or partitioned etcd keeps the TCP connection open),
  the stream is reopened every `watch_refresh` seconds from the same
  revision; etcd replays anything missed, and the reopen itself fails with a
  LeaseError if etcd stopped answering. If etcd compacted the history past
  `after_revision`, watch returns the current state (maybe unchanged).
"""

from __future__ import annotations

import builtins
import logging
import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import trio

from litefspy.errors import LeaseError
from litefspy.lease.base import HandoffToken, LeaseState, PrimaryInfo
from litefspy.lease.etcd_gateway import (
    GRPC_NOT_FOUND,
    EtcdGateway,
    EtcdRequestError,
    EtcdUnreachableError,
    as_int,
    b64,
    unb64,
)
from litefspy.logs import kv

log = logging.getLogger(__name__)

CLUSTER_ID_SUFFIX = "/cluster-id"


class EtcdLease:
    """The primary role held through an etcd lease. Created by `EtcdLeaser`."""

    def __init__(
        self,
        leaser: EtcdLeaser,
        *,
        lease_id: int,
        epoch: int,
        primary: PrimaryInfo,
        expires_at: float,
    ) -> None:
        self._leaser = leaser
        self._lease_id = lease_id
        self._epoch = epoch
        self._primary = primary
        # Our own (conservative) view of when etcd may drop the lease.
        self._expires_at = expires_at
        self._lost = trio.Event()
        self._lost_reason: str | None = None
        self._handed_off = False
        # Renewal and handoff both read or write the key; serialising them keeps a
        # renewal from mistaking our own handoff for someone else's write.
        self._lock = trio.Lock()

    @property
    def primary(self) -> PrimaryInfo:
        """This node, as the key names it."""
        return self._primary

    @property
    def epoch(self) -> int:
        """The key's mod_revision when this node wrote (or was handed) it."""
        return self._epoch

    @property
    def ttl(self) -> float:
        """Configured lease TTL in seconds."""
        return self._leaser.ttl

    @property
    def lease_id(self) -> int:
        """etcd's lease id (for logs and status)."""
        return self._lease_id

    @property
    def lost(self) -> trio.Event:
        """Set once this node must stop acting as primary."""
        return self._lost

    @property
    def lost_reason(self) -> str | None:
        """Why `lost` was set, None while valid."""
        return self._lost_reason

    @property
    def expires_at(self) -> float:
        """Trio time by which etcd may drop the lease, by our conservative reckoning.

        The send time of the last keepalive etcd confirmed, plus the TTL.
        """
        return self._expires_at

    def deadline(self) -> float:
        """Trio time after which this node must not act as primary (-inf once lost)."""
        if self._lost.is_set():
            return -math.inf
        return self._expires_at - self._leaser.margin

    def _log_fields(self) -> dict[str, Any]:
        return {"key": self._leaser.key, "lease": f"{self._lease_id:x}", "epoch": self._epoch}

    def _lose(self, reason: str) -> None:
        if self._lost.is_set():
            return
        self._lost_reason = reason
        self._lost.set()
        if reason == "released":
            # A graceful stop (or a step-down): nothing was lost.
            log.info("lease released %s", kv(**self._log_fields()))
        elif self._handed_off:
            log.info("lease handed off %s", kv(**self._log_fields(), reason=reason))
        else:
            log.warning("lease lost %s", kv(**self._log_fields(), reason=reason))

    async def run(self) -> None:
        """Renew every ttl/3 until lost; returns once `lost` is set, never raises LeaseError."""
        if self._lost.is_set():
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._watchdog)
            await self._lost.wait()
            # Also abandons a renewal request that is still hanging.
            nursery.cancel_scope.cancel()

    async def _watchdog(self) -> None:
        while True:
            deadline = self._expires_at - self._leaser.margin
            if trio.current_time() >= deadline:
                self._lose(f"no renewal confirmed by etcd within {self.ttl:g}s ttl minus margin")
                return
            await trio.sleep_until(deadline)

    async def _renew_loop(self) -> None:
        interval = self.ttl / 3
        retry = max(0.1, min(interval, self.ttl / 10))
        next_at = self._expires_at - self.ttl + interval
        while True:
            await trio.sleep_until(next_at)
            try:
                async with self._lock:
                    if self._lost.is_set():
                        return
                    await self._renew_once()
            except LeaseError as e:
                log.warning("lease renewal failed %s", kv(**self._log_fields(), error=e))
                next_at = trio.current_time() + retry
            else:
                next_at = self._expires_at - self.ttl + interval

    async def _renew_once(self) -> None:
        sent_at = trio.current_time()
        # Bound by the deadline too: an answer after it could not revive the lease.
        deadline = self._expires_at - self._leaser.margin
        time_limit = max(0.05, min(self._leaser.request_timeout, deadline - sent_at))
        granted = await self._leaser._keepalive(self._lease_id, time_limit=time_limit)
        if granted <= 0:
            self._lose(f"etcd lease {self._lease_id:x} expired or was revoked")
            return
        problem = await self._leaser._check_key(self._lease_id, self._epoch, self._primary)
        if problem is not None:
            self._lose(problem)
            return
        self._expires_at = max(self._expires_at, sent_at + min(self.ttl, granted))
        log.debug("lease renewed %s", kv(**self._log_fields(), ttl=granted))

    async def release(self) -> None:
        """Stop being primary and revoke the etcd lease so a successor can take over now.

        Sets `lost` first. Does not revoke after a handoff (the target holds the
        same etcd lease). Raises LeaseError if etcd could not be told; the lease
        then expires by itself after its TTL.
        """
        self._lose("released")
        if self._handed_off:
            return
        try:
            await self._leaser._gateway.call(
                "lease/revoke", {"ID": str(self._lease_id)}, idempotent=True
            )
        except EtcdRequestError as e:
            if e.code != GRPC_NOT_FOUND:
                raise LeaseError(f"{e} (lease expires within {self.ttl:g}s)") from None
            # Already expired or revoked: the key is gone, which is what we wanted.
        except EtcdUnreachableError as e:
            raise LeaseError(f"{e} (lease expires within {self.ttl:g}s)") from None
        log.info("lease revoked %s", kv(**self._log_fields()))

    async def handoff(self, target: PrimaryInfo) -> HandoffToken:
        """Re-point the key at `target` with this same etcd lease; see `Lease.handoff`."""
        async with self._lock:
            if self._lost.is_set():
                raise LeaseError(
                    f"cannot hand off: the lease is already lost ({self._lost_reason})"
                )
            try:
                answer = await self._leaser._gateway.call(
                    "kv/txn",
                    {
                        "compare": [_compare_mod(self._leaser.key, self._epoch)],
                        "success": [_put(self._leaser.key, target.to_json(), self._lease_id)],
                    },
                    idempotent=False,
                )
            except EtcdUnreachableError as e:
                if e.maybe_applied:
                    self._lose("handoff outcome unknown: etcd did not answer")
                raise
            if not answer.get("succeeded"):
                self._lose("key changed before the handoff")
                raise LeaseError(
                    f"cannot hand off {self._leaser.key}: it no longer names this node at epoch "
                    f"{self._epoch}"
                )
            new_epoch = as_int(answer.get("header", {}), "revision")
            self._handed_off = True
            self._lose(f"handed off to {target.hostname} at epoch {new_epoch}")
            return HandoffToken(lease_id=self._lease_id, epoch=new_epoch, primary=target)


class EtcdLeaser:
    """`Leaser` over etcd's v3 JSON gateway.

    `endpoints` are client URLs (`http://host:2379`), tried in turn on
    connection errors. `ttl` is the lease TTL in seconds (>= 1; etcd rounds
    up to whole seconds). `request_timeout` bounds every request (default
    min(2 s, ttl/4)); `margin` is how long before the TTL runs out the holder
    gives up the role (default ttl/5); `watch_refresh` is how often a quiet
    watch stream is reopened to detect an etcd that stopped answering.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        key: str,
        ttl: float,
        *,
        request_timeout: float | None = None,
        margin: float | None = None,
        watch_refresh: float = 10.0,
    ) -> None:
        if not key:
            raise ValueError("lease.etcd.key must not be empty")
        if not ttl >= 1:
            raise ValueError(f"lease.etcd.ttl must be at least 1s, got {ttl!r}")
        self.key = key
        self.ttl = float(ttl)
        self.margin = ttl / 5 if margin is None else margin
        # Renewals come every ttl/3; the deadline must leave room for at least one.
        if not 0 <= self.margin < ttl * 2 / 3:
            raise ValueError(f"lease margin must be in [0, {ttl * 2 / 3:g}) for ttl {ttl:g}")
        self.request_timeout = min(2.0, ttl / 4) if request_timeout is None else request_timeout
        self.watch_refresh = watch_refresh
        self._gateway = EtcdGateway(endpoints, request_timeout=self.request_timeout)

    @property
    def type(self) -> str:
        """`etcd`."""
        return "etcd"

    @property
    def fixed_primary(self) -> bool:
        """False: candidates race for the key."""
        return False

    @property
    def cluster_id_key(self) -> str:
        """Where the cluster id is stored."""
        return self.key + CLUSTER_ID_SUFFIX

    async def aclose(self) -> None:
        """Close connections to etcd (a held lease keeps running until it expires)."""
        await self._gateway.aclose()

    async def __aenter__(self) -> EtcdLeaser:
        return self

    async def __aexit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def acquire(self, me: PrimaryInfo) -> EtcdLease | None:
        """Grant a lease and create the key with it; None if the key already exists."""
        sent_at = trio.current_time()
        # A grant retried on another endpoint can leak an unused lease; it expires alone.
        grant = await self._gateway.call(
            "lease/grant", {"TTL": str(math.ceil(self.ttl))}, idempotent=True
        )
        lease_id, granted = as_int(grant, "ID"), as_int(grant, "TTL")
        if lease_id == 0 or granted <= 0:
            raise LeaseError(f"etcd granted no usable lease for {self.key}: {grant}")
        try:
            answer = await self._gateway.call(
                "kv/txn",
                {
                    "compare": [_compare_absent(self.key)],
                    "success": [_put(self.key, me.to_json(), lease_id)],
                },
                idempotent=False,
            )
        except LeaseError:
            # If the put did happen, revoking deletes the key again: nobody is
            # left believing they hold it.
            await self._revoke_quietly(lease_id)
            raise
        if not answer.get("succeeded"):
            await self._revoke_quietly(lease_id)
            return None
        epoch = as_int(answer.get("header", {}), "revision")
        lease = EtcdLease(
            self,
            lease_id=lease_id,
            epoch=epoch,
            primary=me,
            expires_at=sent_at + min(self.ttl, granted),
        )
        log.info("lease acquired %s", kv(**lease._log_fields(), node=me.node_id))
        return lease

    async def adopt(self, token: HandoffToken, me: PrimaryInfo) -> EtcdLease:
        """Take over the lease a primary handed to this node (see `EtcdLease.handoff`)."""
        if token.primary.node_id != me.node_id:
            raise LeaseError(
                f"handoff token names node {token.primary.node_id}, not this node ({me.node_id})"
            )
        sent_at = trio.current_time()
        # Both at once: the old primary already stopped writing, so every round trip
        # here is write unavailability.
        granted = 0
        problem: str | None = None
        errors: list[LeaseError] = []

        async def keepalive() -> None:
            nonlocal granted
            try:
                granted = await self._keepalive(token.lease_id, time_limit=self.request_timeout)
            except LeaseError as e:
                errors.append(e)

        async def check() -> None:
            nonlocal problem
            try:
                problem = await self._check_key(token.lease_id, token.epoch, me)
            except LeaseError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keepalive)
            nursery.start_soon(check)
        if errors:
            raise errors[0]
        if granted <= 0:
            raise LeaseError(f"handed-off etcd lease {token.lease_id:x} already expired")
        if problem is not None:
            raise LeaseError(f"cannot adopt handed-off lease: {problem}")
        lease = EtcdLease(
            self,
            lease_id=token.lease_id,
            epoch=token.epoch,
            primary=me,
            expires_at=sent_at + min(self.ttl, granted),
        )
        log.info("lease adopted %s", kv(**lease._log_fields(), node=me.node_id))
        return lease

    async def current(self) -> LeaseState:
        """Read the key: who is primary, at which epoch, as of which revision."""
        answer = await self._range(self.key)
        revision = as_int(answer.get("header", {}), "revision")
        kvs = answer.get("kvs") or []
        if not kvs:
            return LeaseState(primary=None, epoch=0, revision=revision)
        return LeaseState(
            primary=self._parse_primary(kvs[0]),
            epoch=as_int(kvs[0], "mod_revision"),
            revision=revision,
        )

    async def watch(self, after_revision: int) -> LeaseState:
        """Wait for the key to change after `after_revision` (put, delete, expiry)."""
        body = {"create_request": {"key": b64(self.key), "start_revision": str(after_revision + 1)}}
        while True:
            async with self._gateway.stream("watch", body) as stream:
                with trio.move_on_after(self.request_timeout) as scope:
                    created = await stream.receive()
                if scope.cancelled_caught:
                    raise EtcdUnreachableError(
                        f"etcd at {stream.endpoint} unreachable: watch not confirmed within "
                        f"{self.request_timeout:g}s",
                        maybe_applied=False,
                    )
                message: dict[str, Any] | None = created
                with trio.move_on_after(self.watch_refresh):
                    while True:
                        if message is not None:
                            state = await self._watch_message_state(message)
                            if state is not None:
                                return state
                        message = await stream.receive()
            # Quiet for watch_refresh: reopen from the same revision (see module docstring).

    async def _watch_message_state(self, message: dict[str, Any]) -> LeaseState | None:
        if message.get("canceled") or as_int(message, "compact_revision"):
            # History before compact_revision is gone: report what is there now.
            log.info("lease watch restarted %s", kv(key=self.key, reason=message))
            return await self.current()
        events = message.get("events") or []
        if not events:
            return None  # "created" or a progress notification
        last = events[-1]
        item = last.get("kv", {})
        revision = max(as_int(message.get("header", {}), "revision"), as_int(item, "mod_revision"))
        if last.get("type") == "DELETE":
            return LeaseState(primary=None, epoch=0, revision=revision)
        return LeaseState(
            primary=self._parse_primary(item), epoch=as_int(item, "mod_revision"), revision=revision
        )

    async def cluster_id(self) -> str | None:
        """The stored cluster id, None if none was stored yet."""
        kvs = (await self._range(self.cluster_id_key)).get("kvs") or []
        return unb64(kvs[0].get("value")).decode() if kvs else None

    async def set_cluster_id(self, cluster_id: str) -> str:
        """Store `cluster_id` if no cluster id is stored; return the stored one."""
        if not cluster_id:
            raise ValueError("cluster id must not be empty")
        key = self.cluster_id_key
        answer = await self._gateway.call(
            "kv/txn",
            {
                "compare": [_compare_absent(key)],
                "success": [{"request_put": {"key": b64(key), "value": b64(cluster_id)}}],
                "failure": [{"request_range": {"key": b64(key)}}],
            },
            idempotent=False,
        )
        if answer.get("succeeded"):
            log.info("cluster id stored %s", kv(key=key, cluster_id=cluster_id))
            return cluster_id
        responses = answer.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs") or []
        if not kvs:
            raise LeaseError(f"etcd reported {key} as present but returned no value; retry")
        return unb64(kvs[0].get("value")).decode()

    # Helpers used by EtcdLease (same module, so kept off the public surface).

    async def _range(self, key: str) -> dict[str, Any]:
        return await self._gateway.call("kv/range", {"key": b64(key)}, idempotent=True)

    async def _keepalive(self, lease_id: int, *, time_limit: float) -> int:
        """Refresh the lease; return the TTL etcd granted (0: the lease is gone)."""
        answer = await self._gateway.call(
            "lease/keepalive", {"ID": str(lease_id)}, idempotent=True, time_limit=time_limit
        )
        return as_int(answer, "TTL")

    async def _check_key(self, lease_id: int, epoch: int, me: PrimaryInfo) -> str | None:
        """None if the key names `me` at `epoch` with `lease_id`, else what is wrong."""
        kvs = (await self._range(self.key)).get("kvs") or []
        if not kvs:
            return f"key {self.key} was deleted"
        item = kvs[0]
        if as_int(item, "lease") != lease_id or as_int(item, "mod_revision") != epoch:
            return (
                f"key {self.key} was rewritten at revision {as_int(item, 'mod_revision')} "
                f"(held at epoch {epoch})"
            )
        if self._parse_primary(item).node_id != me.node_id:
            return f"key {self.key} names another node"
        return None

    def _parse_primary(self, item: dict[str, Any]) -> PrimaryInfo:
        try:
            return PrimaryInfo.from_json(unb64(item.get("value")))
        except LeaseError as e:
            raise LeaseError(f"etcd key {self.key} does not hold a litefspy primary: {e}") from None

    async def _revoke_quietly(self, lease_id: int) -> None:
        """Best-effort revoke of a lease we will not use (it expires alone anyway)."""
        try:
            await self._gateway.call("lease/revoke", {"ID": str(lease_id)}, idempotent=True)
        except LeaseError as e:
            log.warning(
                "could not revoke unused lease %s",
                kv(key=self.key, lease=f"{lease_id:x}", error=e, expires_in=self.ttl),
            )


def _compare_absent(key: str) -> dict[str, Any]:
    """Txn compare: the key does not exist (create_revision 0)."""
    return {"target": "CREATE", "result": "EQUAL", "key": b64(key), "create_revision": "0"}


def _compare_mod(key: str, revision: int) -> dict[str, Any]:
    """Txn compare: the key was last written at `revision`."""
    return {"target": "MOD", "result": "EQUAL", "key": b64(key), "mod_revision": str(revision)}


def _put(key: str, value: str, lease_id: int) -> dict[str, Any]:
    """Txn op: put `value` at `key` attached to `lease_id`."""
    return {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease_id)}}
