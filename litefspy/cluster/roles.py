"""The role loop: who is primary, and this node's part in it.

Roles come from the lease (`litefspy.lease`), through one *role loop* that is
the same for both lease types:

* read who holds the lease; a candidate (`lease.candidate: true`) races for
  it when nobody does (static: the configured candidate always gets it);
* the holder promotes itself (after taking what the old primary can still
  send it), serves replication streams at its lease's epoch, runs
  `lease.run()` and demotes itself as soon as `lease.lost` is set, which the
  lease library guarantees by the deadline even if a renewal hangs;
* every other node follows the primary the lease names (the replication
  client is retargeted, never restarted with the process) and watches the
  lease for the next change.

Demotion (lease lost, handed off, or key re-pointed): writes are refused at
once (`store.demote`), every replica gets what this node committed up to
then and an End frame, then the node follows the new primary; if its history
diverged, the new primary's snapshot keeps the old one aside.

Fencing: every Hello carries the lease epoch; the replication client persists
the highest epoch seen (also the ones read from etcd) and refuses older ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from litefspy.cluster.identity import ClusterIdentity
from litefspy.cluster.state import (
    PRIMARY,
    REPLICA,
    WAITING,
    NodeState,
    PendingHandoff,
)
from litefspy.config import Config
from litefspy.errors import LeaseError, LitefspyError
from litefspy.lease.base import HandoffToken, Lease, Leaser, LeaseState, PrimaryInfo
from litefspy.lease.etcd import EtcdLease
from litefspy.logs import kv
from litefspy.progress import SNAPSHOT_RECEIVE
from litefspy.replication.client import ReplicationClient
from litefspy.replication.server import PrimaryIdentity, ReplicationServer, SendTotals
from litefspy.store.store import Store
from litefspy.store.types import Position

log = logging.getLogger(__name__)

# Demotion: how long replicas get to receive the final transactions.
DRAIN_GRACE = 1.0
# A new primary waits at most this long for the old one's final transactions
# (only while the old one is still streaming to it).
CATCHUP_WINDOW = 1.0
# The old primary counts as alive while its last frame is this recent.
LIVE_PRIMARY_LAG_MS = 1500
# Handoff target: apply the final positions within this before adopting.
HANDOFF_APPLY_TIMEOUT = 2.0
# Lease engine unreachable: retry after reconnect-delay, doubling up to this.
ENGINE_RETRY_MAX = 2.0
# Log an unreachable lease engine at WARNING on the first failure and then every N.
ENGINE_WARN_EVERY = 10
POLL = 0.005


@dataclass
class _ClientTask:
    """The replication client's current run (cancelled to retarget or stop it)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class Cluster:
    """This node in its cluster: the role loop, the replication client and server it drives.

    Start `run` with `nursery.start` once `leaser` is set: it returns once the
    role is decided (or the lease engine failed once). `stop` ends it.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        client: ReplicationClient,
        me: PrimaryInfo,
        *,
        asked_for: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.me = me
        self.hostname = me.hostname
        self.advertise_url = me.advertise_url
        self.candidate = config.lease.candidate
        self.state = NodeState(WAITING if self.candidate else REPLICA, me.node_id)
        # Databases applications asked for that have not arrived yet (readiness).
        self._asked_for = asked_for
        self.leaser: Leaser | None = None
        self.lease: Lease | None = None
        self.server: ReplicationServer | None = None
        # What the lease engine said last (None until it was reached once).
        self.lease_state: LeaseState | None = None
        # The last error from the lease engine while it cannot be reached.
        self._lease_trouble: str | None = None
        self.identity = ClusterIdentity(config, client)
        self.nursery: trio.Nursery | None = None
        self._client_task: _ClientTask | None = None
        self.demoting: trio.Event | None = None
        self._lost_lease: Lease | None = None
        # Epoch of the last lease adopted through a handoff (already caught up).
        self._adopted_epoch = 0
        # demote-delay: after handing the lease off, do not race for it until then.
        self.no_acquire_until = -math.inf
        self._role_scope = trio.CancelScope()
        self._role_done = trio.Event()
        # What every term as primary sent to replicas (metrics).
        self.send_totals = SendTotals()
        # Latched by readiness(): this node was primary or caught up once.
        self._ever_ready = False
        # Set while the node checks its databases at startup (status says so).
        self.starting: str | None = None

    def fixed_primary(self) -> bool:
        """The lease names a configured primary (no election, no handoff)."""
        assert self.leaser is not None, "the leaser is set before the role loop starts"
        return self.leaser.fixed_primary

    async def shutdown(self, grace: float) -> None:
        """End the role loop; a primary hands replicas its last commits, then releases."""
        self._role_scope.cancel()
        await self._role_done.wait()
        lease, server = self.lease, self.server
        if server is not None:
            # Writes stop now; the journal/WAL are settled by recovery at the next start.
            self.store.set_writable(False)
            self.state.set_role(WAITING if self.candidate else REPLICA)
            await server.shutdown("shutting down", grace=grace, drain=True)
        if lease is not None:
            try:
                await lease.release()
            except LeaseError as exc:
                log.warning("could not release the lease at shutdown: %s", exc)
            self.lease = None
        await self.stop_client()

    @property
    def cluster_id(self) -> str:
        """The cluster this node belongs to ("" until it knows)."""
        return self.client.cluster_id

    def is_primary(self) -> bool:
        """This node holds the lease and accepts writes."""
        return self.state.role == PRIMARY

    def primary_hostname(self) -> str | None:
        """The current primary's hostname (this node's own when primary); None if unknown."""
        info = self._current_primary()
        return info.hostname if info is not None and info.hostname else None

    def lease_trouble(self) -> str | None:
        """Why the lease engine cannot be reached right now; None while it answers."""
        return self._lease_trouble

    def primary_advertise_url(self) -> str | None:
        """The current primary's advertise URL; None if unknown."""
        info = self._current_primary()
        return info.advertise_url if info is not None and info.advertise_url else None

    def _current_primary(self) -> PrimaryInfo | None:
        if self.is_primary():
            return self.me
        client = self.client
        if client.connected and client.primary is not None:
            hello = client.primary
            return PrimaryInfo(hello.hostname, hello.advertise_url, f"{hello.node_id:016X}")
        state = self.lease_state
        if state is not None and state.primary is not None and state.primary != self.me:
            return state.primary
        return None

    def lag_ms(self) -> int:
        """Milliseconds since the last frame from the primary (0 on the primary)."""
        return 0 if self.is_primary() else self.client.lag_ms()

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): can this node serve its databases?

        A primary is ready once it holds the lease (its databases were opened
        before); a replica once its first catch-up with a primary finished.
        Once ready, a node stays ready (lag is `proxy.max-lag`'s business).
        """
        if self._ever_ready:
            return True, ""
        if self.is_primary() or self.client.ready.is_set():
            self._ever_ready = True
            return True, ""
        return False, self._not_ready_reason_with_requests()

    def not_ready_reason(self) -> str:
        """Why this node is not ready (see readiness); meaningless once it is."""
        if self.starting is not None:
            return f"starting: {self.starting}"
        client = self.client
        if self.state.role == WAITING:
            holder = self.primary_hostname()
            if holder is None:
                return "waiting for the lease: no primary yet"
        if not client.connected:
            url = client.primary_url or self.primary_advertise_url()
            if not url:
                return "no primary known yet"
            why = f"not connected to the primary at {url} yet"
            error = client.stats.last_error
            return f"{why} (last error: {error})" if error else why
        primary = client.primary_hostname() or client.primary_url
        why = f"catching up with the primary {primary}"
        work = [
            f"{p.name} {p.fraction * 100:.0f}%"
            for p in self.store.progress.reports()
            if p.kind == SNAPSHOT_RECEIVE
        ]
        return f"{why}: receiving {', '.join(work)}" if work else why

    def _not_ready_reason_with_requests(self) -> str:
        why = self.not_ready_reason()
        asked = sorted(self._asked_for())
        if asked:
            why += f"; not replicated yet, asked for by applications: {', '.join(asked[:10])}"
        return why

    def lease_epoch(self) -> int:
        """The fencing epoch of the current lease (0 if unknown)."""
        lease = self.lease
        if self.is_primary() and lease is not None:
            return lease.epoch
        state = self.lease_state
        known = state.epoch if state is not None else 0
        if self.client.connected and self.client.primary is not None:
            known = max(known, self.client.primary.epoch)
        return known

    def stream_count(self) -> int:
        """Replication streams open right now (served, or 1 while following)."""
        if self.server is not None:
            return len(self.server.sessions)
        return 1 if self.client.connected else 0

    def replica_count(self) -> int:
        """Replicas streaming from this node."""
        return len(self.server.sessions) if self.server is not None else 0

    async def wait_caught_up(self) -> None:
        """Return once this node is the primary or a replica that has caught up."""
        await self.state.wait_until(
            lambda: self.is_primary() or (self.state.role == REPLICA and self.client.caught_up)
        )

    async def run(
        self,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The role loop; the client, watches and demotions run in `nursery` beside it."""
        self.nursery = nursery
        started = False

        def report() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            with self._role_scope:
                await self._role_loop(report)
        finally:
            self._role_done.set()

    async def _role_loop(self, report: Callable[[], None]) -> None:
        leaser = self.leaser
        assert leaser is not None
        failures = 0
        while True:
            try:
                pending = self.state.take_pending()
                if pending is not None:
                    # A handoff: every millisecond here is write unavailability.
                    lease = await self._adopt(leaser, pending)
                    if lease is not None:
                        await self._hold(lease, report)
                        continue
                state = await self._read_state(leaser)
                if failures:
                    log.info("lease engine reachable again %s", kv(after_failures=failures))
                failures = 0
                self._lease_trouble = None
                lease = await self._try_lease(leaser, state)
                if lease is not None:
                    await self._hold(lease, report)
                    continue
                await self._follow(state)
                report()
                await self._wait_for_change(leaser, state)
            except LeaseError as exc:
                failures += 1
                self._lease_trouble = str(exc)
                await self._on_engine_trouble(exc, failures)
                report()
                delay = self.config.lease.reconnect_delay * 2 ** min(failures - 1, 10)
                with trio.move_on_after(min(delay, max(self.config.lease.reconnect_delay, 2.0))):
                    await self.state.wake.wait()
                self.state.clear_wake()

    async def _read_state(self, leaser: Leaser) -> LeaseState:
        await self.identity.check(leaser)
        state = await leaser.current()
        self.lease_state = state
        if state.epoch:
            await self.client.note_epoch(state.epoch)
        primary = state.primary
        if primary is not None and primary.advertise_url and primary.node_id:
            await self.identity.remember_primary(primary)
        return state

    async def _try_lease(self, leaser: Leaser, state: LeaseState) -> Lease | None:
        """The lease, if this node should and can take it now."""
        pending = self.state.take_pending()
        if pending is not None:
            return await self._adopt(leaser, pending)
        if not self.candidate:
            return None
        if state.primary is None or leaser.fixed_primary:
            if trio.current_time() < self.no_acquire_until:
                return None
            return await leaser.acquire(self.me)
        if state.primary.node_id == self.me.node_id:
            return await self._readopt(leaser, state)
        return None

    async def _readopt(self, leaser: Leaser, state: LeaseState) -> Lease | None:
        """The key still names this node at the epoch of a lease it lost (etcd was
        unreachable but kept the lease alive): take that same lease back.

        Safe: nobody else can have held the key in between, since it still
        names this node at the same revision.
        """
        lost = self._lost_lease
        if not isinstance(lost, EtcdLease) or lost.epoch != state.epoch:
            return None
        self._lost_lease = None
        token = HandoffToken(lease_id=lost.lease_id, epoch=lost.epoch, primary=self.me)
        try:
            lease = await leaser.adopt(token, self.me)
        except LeaseError as exc:
            log.info("could not take back the lost lease, waiting for it to expire: %s", exc)
            return None
        log.info("took back the lease this node had lost %s", kv(epoch=lease.epoch))
        return lease

    async def _adopt(self, leaser: Leaser, pending: PendingHandoff) -> Lease | None:
        """Target side of a handoff: apply the final positions, then adopt the lease."""
        token = pending.token
        try:
            if not self.candidate:
                raise LeaseError(f"{self.hostname} is not a candidate (lease.candidate: false)")
            with trio.move_on_after(HANDOFF_APPLY_TIMEOUT) as late:
                await self.state.wait_until(lambda: self._has_positions(pending.positions), POLL)
            if late.cancelled_caught:
                log.error(
                    "handoff: the final transactions did not arrive in time; adopting anyway, "
                    "the old primary keeps the missing ones aside when it rejoins %s",
                    kv(epoch=token.epoch),
                )
            lease = await leaser.adopt(token, self.me)
            self._adopted_epoch = lease.epoch
        except LeaseError as exc:
            pending.error = str(exc)
            pending.done.set()
            log.error("handoff failed: cannot adopt the lease: %s", exc)
            return None
        pending.done.set()
        return lease

    def _has_positions(self, positions: dict[str, Position]) -> bool:
        return all(self._local_pos(name) == pos for name, pos in positions.items())

    def _local_pos(self, name: str) -> Position | None:
        try:
            db = self.store.get(name)
        except LitefspyError:
            return None
        return db.pos if db is not None else None

    async def _hold(self, lease: Lease, report: Callable[[], None]) -> None:
        """Be the primary until the lease is lost (or handed off), then demote."""
        self.lease = lease
        assert self.leaser is not None
        await self.identity.store(self.leaser, lease)
        if self._client_task is not None and lease.epoch != self._adopted_epoch:
            await self._catch_up_from_old_primary(lease)
        await self.stop_client()
        if self.demoting is not None:
            # A failed handoff, or a quick re-election: the last demotion must be settled.
            await self.demoting.wait()
            self.demoting = None
        if trio.current_time() >= lease.deadline():
            log.warning(
                "lease lost before this node could act as primary %s",
                kv(epoch=lease.epoch, reason=lease.lost_reason),
            )
            self.lease = None
            self._lost_lease = lease
            return
        server = ReplicationServer(
            self.store,
            PrimaryIdentity(self.store.node_id, self.hostname, self.advertise_url),
            cluster_id=self.cluster_id,
            epoch=lease.epoch,
            totals=self.send_totals,
        )
        self.server = server
        self.store.promote()
        self.state.set_role(PRIMARY)
        log.info(
            "this node is the primary %s",
            kv(lease=self.config.lease.type, epoch=lease.epoch, ttl=lease.ttl),
        )
        report()
        # Fencing: after a restart this node still refuses anything older.
        await self.client.note_epoch(lease.epoch)
        await self.identity.remember_primary(self.me)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lease.run)
            await lease.lost.wait()
            # Writes stop the moment the lease is lost, not once run() has wound down.
            self.start_demote()
        reason = lease.lost_reason or "lease lost"
        await self._demote(server, reason)
        self.lease = None
        self._lost_lease = lease

    async def _catch_up_from_old_primary(self, lease: Lease) -> None:
        """Take what the old primary still sends (it drains before its End frame)."""
        client = self.client
        if not client.connected or client.lag_ms() > LIVE_PRIMARY_LAG_MS:
            return
        old = client.primary.hostname if client.primary is not None else client.primary_url
        done = client.stream_done
        window = min(CATCHUP_WINDOW, max(0.0, lease.deadline() - trio.current_time()) / 2)
        with trio.move_on_after(window) as scope:
            await done.wait()
        log.info(
            "caught up from the old primary before taking over %s",
            kv(old_primary=old, complete=not scope.cancelled_caught),
        )

    def start_demote(self) -> trio.Event:
        """Refuse writes now and settle the databases in the background (idempotent)."""
        if self.demoting is None:
            done = trio.Event()
            # Right now, before anything else runs: no commit after this point.
            self.store.set_writable(False)

            async def settle() -> None:
                try:
                    await self.store.demote()
                except Exception:
                    # Writes are refused already; a failure to settle must not take the
                    # mount (and the replica's reads) down with it.
                    log.exception(
                        "demotion could not settle the databases; they stay read-only, "
                        "restart the node to run its startup recovery"
                    )
                finally:
                    done.set()

            assert self.nursery is not None
            self.nursery.start_soon(settle)
            self.demoting = done
        return self.demoting

    async def _demote(self, server: ReplicationServer, reason: str) -> None:
        """Primary -> not primary: stop writes, hand replicas the final commits, settle."""
        started = trio.current_time()
        demoted = self.start_demote()
        self.state.set_role(WAITING if self.candidate else REPLICA)
        self.server = None
        log.warning("demoting: no longer the primary %s", kv(reason=reason))
        await server.shutdown(f"demoted: {reason}", grace=DRAIN_GRACE, drain=True)
        server.close()
        await demoted.wait()
        self.demoting = None
        log.info("demoted %s", kv(ms=f"{(trio.current_time() - started) * 1000:.1f}"))

    async def _follow(self, state: LeaseState) -> None:
        """Replicate from the primary the lease names (or keep waiting for one)."""
        primary = state.primary
        if primary is not None and primary.node_id != self.me.node_id and primary.advertise_url:
            await self._start_client(primary.advertise_url)
            self.state.set_role(REPLICA)
            return
        # Nobody (or a stale key of this very node): keep taking what the last
        # primary still sends, and wait.
        self.state.set_role(WAITING if self.candidate else REPLICA)

    async def _on_engine_trouble(self, exc: LeaseError, failures: int) -> None:
        known = self.identity.known_primary
        following = self._client_task is not None
        if (
            not following
            and not self.is_primary()
            and known is not None
            and known.node_id != self.me.node_id
        ):
            # Serve reads from the last primary we knew while the engine is away.
            await self._start_client(known.advertise_url)
            self.state.set_role(REPLICA)
            following = True
        if failures == 1 or failures % ENGINE_WARN_EVERY == 0:
            if following:
                doing = f"following {self.client.primary_url} meanwhile"
            else:
                doing = "serving reads only"
            log.warning(
                "cannot reach the lease engine; retrying (%s) %s: %s",
                doing,
                kv(lease=self.config.lease.type, failures=failures),
                exc,
            )

    async def _wait_for_change(self, leaser: Leaser, state: LeaseState) -> None:
        """Until the lease changes, a handoff token arrives, or demote-delay passes."""
        error: LeaseError | None = None
        changed = trio.Event()
        # The watch runs beside the node, not inside this wait: closing its HTTP
        # stream takes a few milliseconds, which a handoff should not wait for.
        watching = trio.CancelScope()

        async def watch() -> None:
            nonlocal error
            with watching:
                try:
                    await leaser.watch(state.revision)
                except LeaseError as exc:
                    error = exc
            changed.set()

        assert self.nursery is not None
        self.nursery.start_soon(watch)
        limit = math.inf
        if self.candidate and state.primary is None:
            limit = max(0.0, self.no_acquire_until - trio.current_time())
        try:
            with trio.move_on_after(limit):
                await first_of(changed, self.state.wake)
        finally:
            watching.cancel()
        self.state.clear_wake()
        if error is not None:
            raise error

    async def _start_client(self, url: str) -> None:
        """(Re)start the replication client against `url` unless it already follows it."""
        if self._client_task is not None and self.client.primary_url == url:
            return
        await self.stop_client()
        self.client.primary_url = url
        task = _ClientTask()
        self._client_task = task
        assert self.nursery is not None
        self.nursery.start_soon(self._run_client, task)

    async def _run_client(self, task: _ClientTask) -> None:
        try:
            with task.scope:
                await self.client.run()
        finally:
            task.done.set()

    async def stop_client(self) -> None:
        task, self._client_task = self._client_task, None
        if task is not None:
            task.scope.cancel()
            await task.done.wait()


async def first_of(*events: trio.Event) -> None:
    """Return as soon as any of `events` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
