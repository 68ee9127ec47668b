"""The composition root: builds the store, the FUSE layer, the lease, replication
and the gRPC server from the config, and runs them in one trio nursery.

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

Handoff (`Admin.Promote` on the target, `litefspy run --promote`,
`lease.promote: true`): the target asks the primary (`Admin.Handoff`), which
stops writes, waits until the target's stream has carried every transaction,
re-points the lease at the target and sends the token in a Handoff frame (and
in the RPC's reply); the target adopts the lease once it has applied those
positions and promotes itself.

Fencing: every Hello carries the lease epoch; the replication client persists
the highest epoch seen (also the ones read from etcd) and refuses older ones.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from litefspy import services
from litefspy.config import Config, split_host_port
from litefspy.errors import ConfigError, LeaseError, LitefspyError
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.lease.base import HandoffToken, Lease, Leaser, LeaseState, PrimaryInfo
from litefspy.lease.etcd import EtcdLease, EtcdLeaser
from litefspy.lease.static import StaticLeaser
from litefspy.logs import kv
from litefspy.metrics import ReplicaLink, ReplicationStats
from litefspy.progress import SNAPSHOT_RECEIVE
from litefspy.replication import bridge
from litefspy.replication.bridge import Code, Frame, GRPCServer, RPCRefused
from litefspy.replication.client import ReplicaIdentity, ReplicationClient
from litefspy.replication.identity import (
    load_cluster_id,
    load_last_primary,
    new_cluster_id,
    save_cluster_id,
    save_last_primary,
)
from litefspy.replication.server import (
    PrimaryIdentity,
    ReplicaSession,
    ReplicationServer,
    SendTotals,
)
from litefspy.replication.status import (
    HANDOFF_METHOD,
    PROMOTE_METHOD,
    NodeDescription,
    RoleSnapshot,
    StatusService,
)
from litefspy.store.store import Store
from litefspy.store.types import Position
from litefspy.v1 import admin_pb2, replication_pb2

if TYPE_CHECKING:
    from litefspy.backup.runner import BackupRunner
    from litefspy.backup.uploader import BackupProgress

log = logging.getLogger(__name__)

PRIMARY = "primary"
REPLICA = "replica"
WAITING = "candidate-waiting"

# How long replicas get to receive the End frame, and RPCs to finish, at shutdown.
SHUTDOWN_GRACE = 1.0
# Demotion: how long replicas get to receive the final transactions.
DRAIN_GRACE = 1.0
# A new primary waits at most this long for the old one's final transactions
# (only while the old one is still streaming to it).
CATCHUP_WINDOW = 1.0
# The old primary counts as alive while its last frame is this recent.
LIVE_PRIMARY_LAG_MS = 1500
# Handoff: the target must have every transaction within this (primary side)...
HANDOFF_SYNC_TIMEOUT = 5.0
# ...and apply the final positions within this before adopting (target side).
HANDOFF_APPLY_TIMEOUT = 2.0
# `Admin.Promote` gives up after this unless the request says otherwise.
PROMOTE_TIMEOUT = 15.0
# Lease engine unreachable: retry after reconnect-delay, doubling up to this.
ENGINE_RETRY_MAX = 2.0
# Log an unreachable lease engine at WARNING on the first failure and then every N.
ENGINE_WARN_EVERY = 10
_POLL = 0.005


class ClusterMismatchError(LitefspyError):
    """This node's data belongs to another cluster than the lease's."""


@dataclass
class _ClientTask:
    """The replication client's current run (cancelled to retarget or stop it)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class _PendingHandoff:
    """A handoff token this node received (Handoff frame or Handoff reply)."""

    token: HandoffToken
    positions: dict[str, Position]
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


class _MountView:
    """What `.primary` and `.lag` show (fuse.ops.ClusterView)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def primary_hostname(self) -> str | None:
        node = self._node
        return None if node.is_primary() else node.client.primary_hostname()

    def lag_ms(self) -> int:
        return self._node.lag_ms()

    def not_ready_reason(self) -> str | None:
        node = self._node
        return None if node.readiness()[0] else node.not_ready_reason()


class Node:
    """One litefspy process: one store, one mount, one gRPC server, a role that changes.

    Satisfies `litefspy.services.NodeView`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        lease = config.lease
        self.data_dir = Path(config.data.dir)
        self.store = Store(
            self.data_dir,
            compress=config.data.compress,
            strict_verify=config.strict_verify,
            mount_dir=Path(config.fuse.dir),
        )
        self.candidate = lease.candidate
        self.hostname = lease.hostname
        port = split_host_port(config.grpc.addr)[1]
        if lease.type == "static" and not lease.candidate:
            # A static replica's advertise-url names the primary (as in LiteFS).
            self.advertise_url = f"http://{lease.hostname}:{port}"
        else:
            self.advertise_url = lease.advertise_url
        self.me = PrimaryInfo(
            hostname=self.hostname,
            advertise_url=self.advertise_url,
            node_id=f"{self.store.node_id:016X}",
        )
        if lease.type == "etcd":
            if not lease.etcd.ttl >= 1:
                raise ConfigError(
                    f"{config.source}: lease.etcd.ttl must be at least 1s, got {lease.etcd.ttl:g}s"
                )
            epoch_scope = f"etcd:{lease.etcd.key}"
        else:
            epoch_scope = "static"
        self.client = ReplicationClient(
            self.store,
            ReplicaIdentity(self.store.node_id, self.hostname, self.advertise_url),
            primary_url="",
            data_dir=self.data_dir,
            cluster_id=load_cluster_id(self.data_dir),
            reconnect_delay=lease.reconnect_delay,
            epoch_scope=epoch_scope,
            on_handoff=self._on_handoff_frame,
        )
        self.ops = Operations(self.store, _MountView(self))
        self.backup: BackupRunner | None = None
        if config.backup.enabled:
            from litefspy.backup.runner import BackupRunner

            self.backup = BackupRunner(
                config.backup, self.store, is_primary=self.is_primary, epoch=self.lease_epoch
            )
        self.leaser: Leaser | None = None
        self.lease: Lease | None = None
        self.server: ReplicationServer | None = None
        self.ready = trio.Event()
        self._role = WAITING if self.candidate else REPLICA
        self._role_callbacks: list[Callable[[str], None]] = []
        self._role_changed = trio.Event()
        # What the lease engine said last (None until it was reached once).
        self._state: LeaseState | None = None
        # The last error from the lease engine while it cannot be reached.
        self._lease_trouble: str | None = None
        self._known_primary = load_last_primary(self.data_dir)
        self._cluster_checked = False
        # The lease engine is known to store this node's cluster id.
        self._cluster_stored = False
        self._nursery: trio.Nursery | None = None
        self._client_task: _ClientTask | None = None
        self._wake = trio.Event()
        self._pending: _PendingHandoff | None = None
        self._demoting: trio.Event | None = None
        self._lost_lease: Lease | None = None
        # Epoch of the last lease adopted through a handoff (already caught up).
        self._adopted_epoch = 0
        # demote-delay: after handing the lease off, do not race for it until then.
        self._no_acquire_until = -math.inf
        self._handoff_lock = trio.Lock()
        self._promote_lock = trio.Lock()
        self._role_scope = trio.CancelScope()
        self._role_done = trio.Event()
        # What every term as primary sent to replicas (metrics).
        self.send_totals = SendTotals()
        # Latched by readiness(): this node was primary or caught up once.
        self._ever_ready = False
        # Set while the node checks its databases at startup (status says so).
        self._starting: str | None = None

    # ------------------------------------------------------------ NodeView

    @property
    def role(self) -> str:
        """`primary`, `replica` or `candidate-waiting`."""
        return self._role

    @property
    def cluster_id(self) -> str:
        """The cluster this node belongs to ("" until it knows)."""
        return self.client.cluster_id

    def is_primary(self) -> bool:
        """This node holds the lease and accepts writes."""
        return self._role == PRIMARY

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
        state = self._state
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

    def replication_stats(self) -> ReplicationStats:
        """Both sides of replication since start (metrics)."""
        totals, stats = self.send_totals, self.client.stats
        server = self.server if self.is_primary() else None
        return ReplicationStats(
            files_sent=totals.files,
            snapshots_sent=totals.snapshots,
            bytes_sent=totals.bytes,
            send_errors=totals.errors,
            replicas=[ReplicaLink(s.hostname, True) for s in (server.sessions if server else [])],
            connected_to_primary=not self.is_primary() and self.client.connected,
            files_applied=stats.files_applied,
            snapshots_applied=stats.snapshots_applied,
            bytes_received=stats.bytes_received,
            receive_errors=stats.errors,
        )

    def not_ready_reason(self) -> str:
        """Why this node is not ready (see readiness); meaningless once it is."""
        if self._starting is not None:
            return f"starting: {self._starting}"
        client = self.client
        if self._role == WAITING:
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
        asked = sorted(self.ops.not_replicated)
        if asked:
            why += f"; not replicated yet, asked for by applications: {', '.join(asked[:10])}"
        return why

    def backup_report(self) -> dict[str, Any] | None:
        """The backup's state for status and metrics; None when backup.url is unset."""
        return self.backup.report() if self.backup is not None else None

    def lease_epoch(self) -> int:
        """The fencing epoch of the current lease (0 if unknown)."""
        lease = self.lease
        if self.is_primary() and lease is not None:
            return lease.epoch
        state = self._state
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

    def on_backup_event(self, callback: Callable[[BackupProgress], None]) -> None:
        """Call `callback(progress)` for each backup upload and new error (trio thread)."""
        if self.backup is not None:
            self.backup.listen(callback)

    def on_role_change(self, callback: Callable[[str], None]) -> None:
        """Call `callback(role)` on every role change (on the trio thread)."""
        self._role_callbacks.append(callback)

    async def wait_caught_up(self) -> None:
        """Return once this node is the primary or a replica that has caught up."""
        await self._until(
            lambda: self.is_primary() or (self._role == REPLICA and self.client.caught_up)
        )

    async def _until(self, predicate: Callable[[], bool], poll: float = 0.02) -> None:
        """Return once `predicate()` holds: checked on role changes and every `poll` s."""
        while not predicate():
            changed = self._role_changed
            with trio.move_on_after(poll):
                await changed.wait()

    def _set_role(self, role: str) -> None:
        if role == self._role:
            return
        log.info("role changed %s", kv(old=self._role, new=role, node=self.me.node_id))
        self._role = role
        self._role_changed.set()
        self._role_changed = trio.Event()
        for callback in list(self._role_callbacks):
            try:
                callback(role)
            except Exception:
                log.exception("role change callback failed %s", kv(role=role))

    # ------------------------------------------------------------- running

    async def run(self, command: Sequence[str] | None = None) -> int:
        """Serve until SIGINT/SIGTERM (or until `command` exits); return the exit code."""
        if self.backup is not None and self.config.backup.restore_if_empty:
            await self._restore_if_empty(self.backup)
        mountpoint = Path(self.config.fuse.dir)
        exit_code = 0
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # gRPC first: while the databases are checked (a crash makes
                    # that a full read), `litefspy status` shows the progress and
                    # every other RPC answers UNAVAILABLE "node is starting". Until
                    # the mount exists no application can hold a SQLite lock, so
                    # the RPCs that take locks through it need none.
                    grpc_server = self._grpc_server()
                    services.register_rpcs(self, grpc_server)
                    self._starting = grpc_server.starting = "checking its databases"
                    await nursery.start(grpc_server.serve)
                    await trio.to_thread.run_sync(self.store.open)
                    # Only the primary writes: a static candidate is it by
                    # configuration (writable from the first access); any other
                    # node waits for the lease.
                    self.store.set_writable(self.config.lease.type == "static" and self.candidate)
                    self.leaser = self._build_leaser()
                    self._starting = grpc_server.starting = None
                    await nursery.start(
                        lambda task_status: serve(
                            self.ops,
                            mountpoint,
                            allow_other=self.config.fuse.allow_other,
                            debug=self.config.fuse.debug,
                            task_status=task_status,
                        )
                    )
                    self.store.attach_mount(mountpoint, self.ops)
                    # Returns once the role is decided (or the lease engine failed once).
                    await nursery.start(self._run_role_loop)
                    nursery.start_soon(
                        self.store.run_retention,
                        self.config.data.retention,
                        self.config.data.retention_monitor_interval,
                    )
                    # WAL commits under synchronous=NORMAL leave their LTX fsync to this.
                    nursery.start_soon(self.store.run_flusher)
                    if self.backup is not None:
                        self.on_role_change(self.backup.role_changed)
                        nursery.start_soon(self.backup.run)
                    await nursery.start(services.serve_extras, self)
                    log.info(
                        "node ready %s",
                        kv(
                            role=self.role,
                            lease=self.config.lease.type,
                            dir=mountpoint,
                            data=self.config.data.dir,
                            grpc=self.config.grpc.addr,
                            node=self.me.node_id,
                        ),
                    )
                    self.ready.set()
                    if self.config.lease.promote and self.candidate:
                        nursery.start_soon(self._auto_promote)
                    if command:
                        if await self._wait_until_synced(signals):
                            exit_code = await self._supervise(command, signals)
                    elif self.config.exec:
                        # fuse.yml `exec:`: the node stops when the last command exits.
                        exit_code = await services.run_exec(self, signals)
                    else:
                        await self._wait_for_signal(signals)
                    await self._shutdown(grpc_server)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single_error(group) from None
        finally:
            if self.server is not None:
                self.server.close()
            if self.leaser is not None:
                with trio.CancelScope(shield=True):
                    await self.leaser.aclose()
            self.store.close()
        return exit_code

    async def _restore_if_empty(self, backup: BackupRunner) -> None:
        """backup.restore-if-empty: a node with no databases restores every one first.

        The "every machine was lost" path: before this node serves or asks for
        the lease. An unreachable store stops the start (one line): serving an
        empty data.dir as if it were the data would be worse.
        """
        from litefspy.backup.restore import (
            describe,
            list_databases,
            record_deletion_in_data_dir,
            restore_into_data_dir,
        )

        dbs = self.store.dbs_dir
        if any(p.is_dir() for p in dbs.iterdir()):
            return
        target = backup.target
        try:
            names = await trio.to_thread.run_sync(list_databases, target)
            for name in names:
                found = await trio.to_thread.run_sync(describe, target, name)
                if found.deleted is not None:
                    # Deleted on the primary: bringing it back would undo the deletion.
                    # Its history (the deletion) is kept, so that TXIDs go on from it.
                    await trio.to_thread.run_sync(
                        record_deletion_in_data_dir, target, dbs, name, found.deleted
                    )
                    log.info(
                        "backup.restore-if-empty: database was deleted; not restored %s",
                        kv(db=name, txid=f"{found.deleted.max_txid:016x}"),
                    )
                    continue
                result = await trio.to_thread.run_sync(restore_into_data_dir, target, dbs, name)
                log.info(
                    "restored database from the backup %s",
                    kv(db=name, txid=f"{result.txid:016x}", objects=result.files),
                )
        except LitefspyError as exc:
            raise LitefspyError(
                f"backup.restore-if-empty: {exc}; not starting with an empty data.dir"
            ) from None
        if not names:
            log.info("backup.restore-if-empty: the backup holds no databases yet")

    def _build_leaser(self) -> Leaser:
        lease = self.config.lease
        if lease.type == "etcd":
            return EtcdLeaser(lease.etcd.endpoints, lease.etcd.key, lease.etcd.ttl)
        if lease.candidate:
            return StaticLeaser(self.me, is_primary=True)
        configured = PrimaryInfo(hostname="", advertise_url=lease.advertise_url, node_id="")
        return StaticLeaser(configured, is_primary=False)

    async def _wait_for_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("shutting down %s", kv(signal=signal.Signals(signum).name))
            return

    async def _shutdown(self, grpc_server: GRPCServer) -> None:
        """Stop the role loop; a primary hands replicas its last commits, then releases."""
        with trio.CancelScope(shield=True):
            self._role_scope.cancel()
            await self._role_done.wait()
            lease, server = self.lease, self.server
            if server is not None:
                # Writes stop now; the journal/WAL are settled by recovery at the next start.
                self.store.set_writable(False)
                self._set_role(WAITING if self.candidate else REPLICA)
                await server.shutdown("shutting down", grace=SHUTDOWN_GRACE, drain=True)
            if lease is not None:
                try:
                    await lease.release()
                except LeaseError as exc:
                    log.warning("could not release the lease at shutdown: %s", exc)
                self.lease = None
            await self._stop_client()
            await grpc_server.stop(grace=SHUTDOWN_GRACE)
            # Before the unmount: the lock keeper lets go of its descriptors on it.
            await trio.to_thread.run_sync(self.store.detach_mount)

    # ------------------------------------------------------------ role loop

    async def _run_role_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
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
                pending = self._take_pending()
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
                    await self._wake.wait()
                self._clear_wake()

    async def _read_state(self, leaser: Leaser) -> LeaseState:
        if not self._cluster_checked:
            await self._check_cluster_id(leaser)
        state = await leaser.current()
        self._state = state
        if state.epoch:
            await self.client.note_epoch(state.epoch)
        primary = state.primary
        if (
            primary is not None
            and primary.advertise_url
            and primary.node_id
            and primary != self._known_primary
        ):
            self._known_primary = primary
            await trio.to_thread.run_sync(save_last_primary, self.data_dir, primary)
        return state

    async def _check_cluster_id(self, leaser: Leaser) -> None:
        """Refuse to join a cluster other than the one this node's data belongs to."""
        stored = await leaser.cluster_id()
        local = self.client.cluster_id
        if stored is not None:
            if not local:
                await trio.to_thread.run_sync(save_cluster_id, self.data_dir, stored)
                self.client.cluster_id = stored
                log.info("joined cluster %s", kv(cluster=stored))
            elif stored != local:
                raise ClusterMismatchError(self._mismatch_message(local, stored))
            self._cluster_stored = True
        self._cluster_checked = True

    def _mismatch_message(self, local: str, stored: str) -> str:
        lease = self.config.lease
        where = f"etcd key {lease.etcd.key}" if lease.type == "etcd" else "the lease"
        return (
            f"cluster id mismatch: {self.data_dir} belongs to cluster {local}, but {where} "
            f"belongs to cluster {stored}; a node joins one cluster only: move data.dir aside "
            "to join this cluster (or point lease.etcd.key at the node's own cluster)"
        )

    async def _try_lease(self, leaser: Leaser, state: LeaseState) -> Lease | None:
        """The lease, if this node should and can take it now."""
        pending = self._take_pending()
        if pending is not None:
            return await self._adopt(leaser, pending)
        if not self.candidate:
            return None
        if state.primary is None or leaser.type == "static":
            if trio.current_time() < self._no_acquire_until:
                return None
            return await leaser.acquire(self.me)
        if state.primary.node_id == self.me.node_id:
            return await self._readopt(leaser, state)
        return None

    def _take_pending(self) -> _PendingHandoff | None:
        pending, self._pending = self._pending, None
        return pending

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

    async def _adopt(self, leaser: Leaser, pending: _PendingHandoff) -> Lease | None:
        """Target side of a handoff: apply the final positions, then adopt the lease."""
        token = pending.token
        try:
            if not self.candidate:
                raise LeaseError(f"{self.hostname} is not a candidate (lease.candidate: false)")
            with trio.move_on_after(HANDOFF_APPLY_TIMEOUT) as late:
                await self._until(lambda: self._has_positions(pending.positions), _POLL)
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
        if not self._cluster_stored:
            await self._store_cluster_id(lease)
        if self._client_task is not None and lease.epoch != self._adopted_epoch:
            await self._catch_up_from_old_primary(lease)
        await self._stop_client()
        if self._demoting is not None:
            # A failed handoff, or a quick re-election: the last demotion must be settled.
            await self._demoting.wait()
            self._demoting = None
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
        self._set_role(PRIMARY)
        log.info(
            "this node is the primary %s",
            kv(lease=self.config.lease.type, epoch=lease.epoch, ttl=lease.ttl),
        )
        report()
        # Fencing: after a restart this node still refuses anything older.
        await self.client.note_epoch(lease.epoch)
        if self._known_primary != self.me:
            self._known_primary = self.me
            await trio.to_thread.run_sync(save_last_primary, self.data_dir, self.me)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lease.run)
            await lease.lost.wait()
            # Writes stop the moment the lease is lost, not once run() has wound down.
            self._start_demote()
        reason = lease.lost_reason or "lease lost"
        await self._demote(server, reason)
        self.lease = None
        self._lost_lease = lease

    async def _store_cluster_id(self, lease: Lease) -> None:
        """The first primary of a cluster names it; later ones check they belong to it."""
        leaser = self.leaser
        assert leaser is not None
        local = self.client.cluster_id
        try:
            stored = await leaser.set_cluster_id(local or new_cluster_id())
        except LeaseError as exc:
            if not local:
                local = new_cluster_id()
                await trio.to_thread.run_sync(save_cluster_id, self.data_dir, local)
                self.client.cluster_id = local
            log.warning("could not store the cluster id with the lease, will retry: %s", exc)
            self._cluster_checked = False
            return
        self._cluster_stored = True
        if local and stored != local:
            with trio.CancelScope(shield=True):
                try:
                    await lease.release()
                except LeaseError:
                    pass  # it expires by itself
            raise ClusterMismatchError(self._mismatch_message(local, stored))
        if not local:
            await trio.to_thread.run_sync(save_cluster_id, self.data_dir, stored)
            self.client.cluster_id = stored
            log.info("new cluster %s", kv(cluster=stored))
        self._cluster_checked = True

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

    def _start_demote(self) -> trio.Event:
        """Refuse writes now and settle the databases in the background (idempotent)."""
        if self._demoting is None:
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

            assert self._nursery is not None
            self._nursery.start_soon(settle)
            self._demoting = done
        return self._demoting

    async def _demote(self, server: ReplicationServer, reason: str) -> None:
        """Primary -> not primary: stop writes, hand replicas the final commits, settle."""
        started = trio.current_time()
        demoted = self._start_demote()
        self._set_role(WAITING if self.candidate else REPLICA)
        self.server = None
        log.warning("demoting: no longer the primary %s", kv(reason=reason))
        await server.shutdown(f"demoted: {reason}", grace=DRAIN_GRACE, drain=True)
        server.close()
        await demoted.wait()
        self._demoting = None
        log.info("demoted %s", kv(ms=f"{(trio.current_time() - started) * 1000:.1f}"))

    async def _follow(self, state: LeaseState) -> None:
        """Replicate from the primary the lease names (or keep waiting for one)."""
        primary = state.primary
        if primary is not None and primary.node_id != self.me.node_id and primary.advertise_url:
            await self._start_client(primary.advertise_url)
            self._set_role(REPLICA)
            return
        # Nobody (or a stale key of this very node): keep taking what the last
        # primary still sends, and wait.
        self._set_role(WAITING if self.candidate else REPLICA)

    async def _on_engine_trouble(self, exc: LeaseError, failures: int) -> None:
        known = self._known_primary
        following = self._client_task is not None
        if (
            not following
            and not self.is_primary()
            and known is not None
            and known.node_id != self.me.node_id
        ):
            # Serve reads from the last primary we knew while the engine is away.
            await self._start_client(known.advertise_url)
            self._set_role(REPLICA)
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

        assert self._nursery is not None
        self._nursery.start_soon(watch)
        limit = math.inf
        if self.candidate and state.primary is None:
            limit = max(0.0, self._no_acquire_until - trio.current_time())
        try:
            with trio.move_on_after(limit):
                await _first_of(changed, self._wake)
        finally:
            watching.cancel()
        self._clear_wake()
        if error is not None:
            raise error

    def _clear_wake(self) -> None:
        if self._wake.is_set():
            self._wake = trio.Event()

    # ------------------------------------------------------- client control

    async def _start_client(self, url: str) -> None:
        """(Re)start the replication client against `url` unless it already follows it."""
        if self._client_task is not None and self.client.primary_url == url:
            return
        await self._stop_client()
        self.client.primary_url = url
        task = _ClientTask()
        self._client_task = task
        assert self._nursery is not None
        self._nursery.start_soon(self._run_client, task)

    async def _run_client(self, task: _ClientTask) -> None:
        try:
            with task.scope:
                await self.client.run()
        finally:
            task.done.set()

    async def _stop_client(self) -> None:
        task, self._client_task = self._client_task, None
        if task is not None:
            task.scope.cancel()
            await task.done.wait()

    # --------------------------------------------------------------- handoff

    def _on_handoff_frame(self, handoff: replication_pb2.Handoff) -> None:
        """The primary hands this node the lease (called by the replication client)."""
        try:
            token = HandoffToken.from_json(handoff.token)
        except LeaseError as exc:
            log.error("ignoring an invalid handoff token from the primary: %s", exc)
            return
        positions = {p.name: Position(p.txid, p.checksum) for p in handoff.positions}
        self._offer_handoff(token, positions)

    def _offer_handoff(
        self, token: HandoffToken, positions: dict[str, Position]
    ) -> _PendingHandoff:
        pending = self._pending
        if pending is not None and pending.token.epoch >= token.epoch:
            return pending
        lease = self.lease
        if lease is not None and lease.epoch >= token.epoch:
            done = _PendingHandoff(token, positions)
            done.done.set()
            return done  # adopted already (the frame and the reply both carry it)
        pending = _PendingHandoff(token, positions)
        self._pending = pending
        self._wake.set()
        return pending

    async def _rpc_handoff(self, request: admin_pb2.HandoffRequest) -> admin_pb2.HandoffReply:
        """Primary side: stop writes, let the target catch up, hand it the lease."""
        lease, server = self.lease, self.server
        if lease is None or server is None or not self.is_primary():
            primary = self.primary_hostname()
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"{self.hostname} is not the primary"
                + (f" (the primary is {primary})" if primary else ""),
            )
        try:
            target_id = int(request.target.id, 16)
        except ValueError:
            raise RPCRefused(
                Code.INVALID_ARGUMENT, f"invalid node id {request.target.id!r}"
            ) from None
        session = server.session_for(target_id)
        if session is None:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"node {request.target.hostname} is not replicating from {self.hostname}: "
                "it must be connected and caught up before it can take over",
            )
        if self._handoff_lock.locked():
            raise RPCRefused(Code.UNAVAILABLE, "a handoff is already in progress")
        async with self._handoff_lock:
            return await self._hand_off(lease, server, session, request.target)

    async def _hand_off(
        self,
        lease: Lease,
        server: ReplicationServer,
        session: ReplicaSession,
        target_info: admin_pb2.NodeInfo,
    ) -> admin_pb2.HandoffReply:
        started = trio.current_time()
        caught_up = False
        log.info("handing off the lease %s", kv(target=target_info.hostname, epoch=lease.epoch))
        demoted = self._start_demote()
        final = {db.name: db.pos for db in self.store.databases() if db.pos.txid > 0}
        with trio.move_on_after(HANDOFF_SYNC_TIMEOUT):
            caught_up = await server.wait_caught_up(session)
        if not caught_up:
            await self._abort_handoff(lease, demoted)
            raise RPCRefused(
                Code.UNAVAILABLE,
                f"handoff to {target_info.hostname} aborted: it did not receive every "
                f"transaction within {HANDOFF_SYNC_TIMEOUT:g}s; {self.hostname} stays primary",
            )
        target = PrimaryInfo(
            hostname=target_info.hostname,
            advertise_url=target_info.advertise_url,
            node_id=target_info.id,
        )
        try:
            token = await lease.handoff(target)
        except LeaseError as exc:
            await self._abort_handoff(lease, demoted)
            raise RPCRefused(Code.UNAVAILABLE, f"handoff failed: {exc}") from None
        positions = [
            replication_pb2.Position(name=name, txid=pos.txid, checksum=pos.checksum)
            for name, pos in sorted(final.items())
        ]
        server.send_handoff(
            session,
            replication_pb2.Handoff(
                target_node_id=session.node_id, token=token.to_json(), positions=positions
            ),
        )
        self._no_acquire_until = trio.current_time() + self.config.lease.demote_delay
        log.info(
            "lease handed off %s",
            kv(
                target=target.hostname,
                epoch=token.epoch,
                ms=f"{(trio.current_time() - started) * 1000:.1f}",
            ),
        )
        return admin_pb2.HandoffReply(
            token=token.to_json(),
            positions=[
                admin_pb2.HandoffPosition(name=p.name, txid=p.txid, checksum=p.checksum)
                for p in positions
            ],
        )

    async def _abort_handoff(self, lease: Lease, demoted: trio.Event) -> None:
        """Resume writes after a failed handoff if the lease is still ours."""
        await demoted.wait()
        if lease.lost.is_set() or trio.current_time() >= lease.deadline():
            return  # the role loop demotes
        self._demoting = None
        self.store.promote()
        log.warning("handoff aborted; still the primary, writes resumed")

    async def _rpc_promote(self, request: admin_pb2.PromoteRequest) -> admin_pb2.PromoteReply:
        """Target side of `litefspy run --promote`: become primary through a handoff."""
        if self.is_primary():
            return admin_pb2.PromoteReply(already_primary=True, epoch=self.lease_epoch())
        if not self.candidate:
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"{self.hostname} cannot become primary: lease.candidate is false",
            )
        if self.config.lease.type == "static":
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                "cannot promote: lease.type is static, the primary is fixed by configuration "
                "(use lease.type: etcd for handoff)",
            )
        timeout = request.timeout_seconds or PROMOTE_TIMEOUT
        try:
            with trio.fail_after(timeout):
                previous = await self._promote_via_handoff()
        except trio.TooSlowError:
            raise RPCRefused(
                Code.UNAVAILABLE, f"{self.hostname} did not become primary within {timeout:g}s"
            ) from None
        return admin_pb2.PromoteReply(epoch=self.lease_epoch(), previous_primary=previous)

    async def _promote_via_handoff(self) -> str:
        """Ask the current primary for the lease; return its hostname once promoted."""
        async with self._promote_lock:
            if self.is_primary():
                return ""
            client = self.client
            await self._until(
                lambda: self._role == REPLICA and client.connected and client.caught_up
            )
            assert client.primary is not None
            previous = client.primary.hostname
            url = client.primary_url
            log.info("asking the primary for the lease %s", kv(primary=previous, url=url))
            request = admin_pb2.HandoffRequest(
                target=admin_pb2.NodeInfo(
                    id=self.me.node_id, hostname=self.hostname, advertise_url=self.advertise_url
                )
            )
            reply = await bridge.acall_unary(
                url,
                HANDOFF_METHOD,
                request,
                admin_pb2.HandoffReply,
                deadline=HANDOFF_SYNC_TIMEOUT + 5.0,
            )
            token = HandoffToken.from_json(reply.token)
            positions = {p.name: Position(p.txid, p.checksum) for p in reply.positions}
            pending = self._offer_handoff(token, positions)
            await pending.done.wait()
            if pending.error is not None:
                raise LeaseError(f"handoff from {previous} failed: {pending.error}")
            # Adopted: the role loop promotes this node next.
            await self._until(self.is_primary, _POLL)
            return previous

    async def _auto_promote(self) -> None:
        """`lease.promote: true`: once caught up with a primary, ask it for the lease."""
        if self.config.lease.type == "static":
            log.warning("lease.promote has no effect with lease.type static")
            return
        await self.wait_caught_up()
        if self.is_primary():
            return
        try:
            with trio.fail_after(PROMOTE_TIMEOUT):
                previous = await self._promote_via_handoff()
        except (LitefspyError, trio.TooSlowError) as exc:
            log.warning("lease.promote: could not take over the lease: %s", exc or "timed out")
            return
        log.info("lease.promote: took over the lease %s", kv(previous=previous))

    # ---------------------------------------------------------------- gRPC

    def _grpc_server(self) -> GRPCServer:
        lease = self.config.lease
        backup = self.backup
        status = StatusService(
            self.store,
            NodeDescription(self.store.node_id, self.hostname, self.advertise_url, lease.type),
            self._role_snapshot,
            backup=backup.report if backup is not None else lambda: None,
        )
        server = GRPCServer(
            self.config.grpc.listen_address,
            stream_handler=self._stream,
            status_handler=status.reply,
        )
        server.add_unary(
            PROMOTE_METHOD, self._rpc_promote, admin_pb2.PromoteRequest, admin_pb2.PromoteReply
        )
        server.add_unary(
            HANDOFF_METHOD, self._rpc_handoff, admin_pb2.HandoffRequest, admin_pb2.HandoffReply
        )
        return server

    def _role_snapshot(self) -> RoleSnapshot:
        lease = self.lease if self.is_primary() else None
        expires_in: int | None = None
        if lease is not None and math.isfinite(lease.deadline()):
            expires_in = max(0, int((lease.deadline() - trio.current_time()) * 1000))
        holder: str | None = None
        if self.config.lease.type != "static":
            if lease is not None:
                holder = self.hostname
            elif self._state is not None and self._state.primary is not None:
                holder = self._state.primary.hostname
        return RoleSnapshot(
            role=self._role,
            epoch=self.lease_epoch(),
            cluster_id=self.cluster_id,
            candidate=self.candidate,
            server=self.server if self.is_primary() else None,
            client=self.client,
            expires_in_ms=expires_in,
            holder=holder,
            ready=self.readiness(),
        )

    async def _stream(
        self,
        request: replication_pb2.StreamRequest,
        peer: str,
        send: trio.MemorySendChannel[Frame],
    ) -> None:
        server = self.server
        if server is not None and self.is_primary():
            await server.stream(request, peer, send)
            return
        await trio.lowlevel.checkpoint()
        if request.node_id == self.store.node_id:
            log.error("refused a replication stream from this node itself %s", kv(peer=peer))
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"node {self.hostname} refuses to replicate from itself: "
                "lease.advertise-url must name the primary, not this node",
            )
        primary = self.primary_hostname()
        log.info(
            "refused a replication stream: this node is not the primary %s",
            kv(peer=peer, hostname=request.hostname),
        )
        raise RPCRefused(
            Code.FAILED_PRECONDITION,
            f"node {self.hostname} is not the primary"
            + (f" (the primary is {primary})" if primary else ""),
        )

    # ----------------------------------------------------------- commands

    async def _wait_until_synced(self, signals: AsyncIterator[int]) -> bool:
        """Unless skip-sync, wait to be primary or a caught-up replica; False on a signal."""
        if self.config.skip_sync:
            return True
        if not self.is_primary():
            log.info("waiting to catch up with the primary before starting the command")
        synced = False
        async with trio.open_nursery() as nursery:

            async def wait_ready() -> None:
                nonlocal synced
                await self.wait_caught_up()
                synced = True
                nursery.cancel_scope.cancel()

            async def wait_signal() -> None:
                await self._wait_for_signal(signals)
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_ready)
            nursery.start_soon(wait_signal)
        return synced

    async def _supervise(self, command: Sequence[str], signals: AsyncIterator[int]) -> int:
        """Run the application command, forwarding SIGINT/SIGTERM; return its exit code."""
        log.info("starting command %s", kv(cmd=" ".join(command)))
        proc = await trio.lowlevel.open_process(list(command))
        async with trio.open_nursery() as nursery:

            async def forward() -> None:
                async for signum in signals:
                    proc.send_signal(signum)

            nursery.start_soon(forward)
            code = await proc.wait()
            nursery.cancel_scope.cancel()
        log.info("command exited %s", kv(code=code))
        return code if code >= 0 else 128 - code


async def _first_of(*events: trio.Event) -> None:
    """Return as soon as any of `events` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful error of a nursery's group (so the CLI prints one line)."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        exc = todo.pop()
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    if len(leaves) == 1:
        return leaves[0]
    for leaf in leaves:
        if isinstance(leaf, LitefspyError):
            return leaf
    return group


__all__ = ["ClusterMismatchError", "Node"]
