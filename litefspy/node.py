"""The composition root: builds the store, the FUSE layer, the lease, replication
and the gRPC server from the config, and runs them in one trio nursery.

Who is primary is `litefspy.cluster` (the role loop in `cluster/roles.py`,
handoff in `cluster/handoff.py`); the RPC handlers are `litefspy.api`; the
gRPC plumbing is `litefspy.rpc`. Nothing imports this module but the CLI.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from litefspy import api, supervisor
from litefspy.api.admin import AdminService, NodeDescription, StatusService, role_snapshot
from litefspy.api.replication import ReplicationService
from litefspy.cluster.adapters import (
    MountView,
    NodeMetricsSource,
    NodeProxyState,
    local_txid,
    replication_stats,
)
from litefspy.cluster.handoff import Handoffs
from litefspy.cluster.identity import ClusterMismatchError
from litefspy.cluster.roles import Cluster
from litefspy.cluster.view import NodeView
from litefspy.config import Config, split_host_port
from litefspy.errors import ConfigError, LitefspyError
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.lease.base import Leaser, PrimaryInfo
from litefspy.lease.etcd import EtcdLeaser
from litefspy.lease.static import StaticLeaser
from litefspy.logs import kv
from litefspy.metrics import Metrics, ReplicationStats
from litefspy.proxy import TxidWaiters, serve_proxy
from litefspy.replication.client import ReplicaIdentity, ReplicationClient
from litefspy.replication.identity import load_cluster_id
from litefspy.rpc.server import GRPCServer
from litefspy.store.store import Store

if TYPE_CHECKING:
    from litefspy.backup.runner import BackupRunner
    from litefspy.backup.uploader import BackupProgress

log = logging.getLogger(__name__)

# How long replicas get to receive the End frame, and RPCs to finish, at shutdown.
SHUTDOWN_GRACE = 1.0


class Node:
    """One litefspy process: one store, one mount, one gRPC server, a role that changes.

    Satisfies `litefspy.cluster.view.NodeView`.
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
        )
        self.cluster = Cluster(
            config, self.store, self.client, self.me, asked_for=lambda: self.ops.not_replicated
        )
        self.ops = Operations(self.store, MountView(self.cluster))
        self.handoffs = Handoffs(self.cluster)
        self.client.on_handoff = self.handoffs.on_handoff_frame
        self.backup: BackupRunner | None = None
        if config.backup.enabled:
            from litefspy.backup.runner import BackupRunner

            self.backup = BackupRunner(
                config.backup, self.store, is_primary=self.is_primary, epoch=self.lease_epoch
            )
        self.leaser: Leaser | None = None
        self.ready = trio.Event()

    # ------------------------------------------------------------ NodeView

    @property
    def role(self) -> str:
        """`primary`, `replica` or `candidate-waiting`."""
        return self.cluster.state.role

    def is_primary(self) -> bool:
        """This node holds the lease and accepts writes."""
        return self.cluster.is_primary()

    def primary_hostname(self) -> str | None:
        """The current primary's hostname (this node's own when primary); None if unknown."""
        return self.cluster.primary_hostname()

    def primary_advertise_url(self) -> str | None:
        """The current primary's advertise URL; None if unknown."""
        return self.cluster.primary_advertise_url()

    def lease_trouble(self) -> str | None:
        """Why the lease engine cannot be reached right now; None while it answers."""
        return self.cluster.lease_trouble()

    def lag_ms(self) -> int:
        """Milliseconds since the last frame from the primary (0 on the primary)."""
        return self.cluster.lag_ms()

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): see `Cluster.readiness`."""
        return self.cluster.readiness()

    def not_ready_reason(self) -> str:
        """Why this node is not ready (see readiness); meaningless once it is."""
        return self.cluster.not_ready_reason()

    def lease_epoch(self) -> int:
        """The fencing epoch of the current lease (0 if unknown)."""
        return self.cluster.lease_epoch()

    def stream_count(self) -> int:
        """Replication streams open right now (served, or 1 while following)."""
        return self.cluster.stream_count()

    def replica_count(self) -> int:
        """Replicas streaming from this node."""
        return self.cluster.replica_count()

    def on_role_change(self, callback: Callable[[str], None]) -> None:
        """Call `callback(role)` on every role change (on the trio thread)."""
        self.cluster.state.on_role_change(callback)

    async def wait_caught_up(self) -> None:
        """Return once this node is the primary or a replica that has caught up."""
        await self.cluster.wait_caught_up()

    def replication_stats(self) -> ReplicationStats:
        """Both sides of replication since start (metrics)."""
        return replication_stats(self.cluster)

    def backup_report(self) -> dict[str, Any] | None:
        """The backup's state for status and metrics; None when backup.url is unset."""
        return self.backup.report() if self.backup is not None else None

    def on_backup_event(self, callback: Callable[[BackupProgress], None]) -> None:
        """Call `callback(progress)` for each backup upload and new error (trio thread)."""
        if self.backup is not None:
            self.backup.listen(callback)

    # ------------------------------------------------------------- running

    async def run(self, command: Sequence[str] | None = None) -> int:
        """Serve until SIGINT/SIGTERM (or until `command` exits); return the exit code."""
        if self.backup is not None and self.config.backup.restore_if_empty:
            await self.backup.restore_if_empty(self.store.dbs_dir)
        mountpoint = Path(self.config.fuse.dir)
        exit_code = 0
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    # gRPC first: while the databases are checked (a crash makes
                    # that a full read), `litefspy status` shows the progress and
                    # every other RPC answers UNAVAILABLE "node is starting". Until
                    # the mount exists no application can hold a SQLite lock, so
                    # the RPCs that take locks through it need none.
                    grpc_server = self._grpc_server()
                    api.register_rpcs(self, grpc_server)
                    self.cluster.starting = grpc_server.starting = "checking its databases"
                    await nursery.start(grpc_server.serve)
                    await trio.to_thread.run_sync(self.store.open)
                    # Only the primary writes: a static candidate is it by
                    # configuration (writable from the first access); any other
                    # node waits for the lease.
                    self.leaser = self.cluster.leaser = self._build_leaser()
                    self.store.set_writable(self.leaser.fixed_primary and self.candidate)
                    self.cluster.starting = grpc_server.starting = None
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
                    await nursery.start(self.cluster.run, nursery)
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
                    await nursery.start(serve_extras, self)
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
                        nursery.start_soon(self.handoffs.auto_promote)
                    if command:
                        if await self._wait_until_synced(signals):
                            exit_code = await self._supervise(command, signals)
                    elif self.config.exec:
                        # fuse.yml `exec:`: the node stops when the last command exits.
                        exit_code = await supervisor.run_exec(self, signals)
                    else:
                        await self._wait_for_signal(signals)
                    await self._shutdown(grpc_server)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single_error(group) from None
        finally:
            if self.cluster.server is not None:
                self.cluster.server.close()
            if self.leaser is not None:
                with trio.CancelScope(shield=True):
                    await self.leaser.aclose()
            self.store.close()
        return exit_code

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
            await self.cluster.shutdown(grace=SHUTDOWN_GRACE)
            await grpc_server.stop(grace=SHUTDOWN_GRACE)
            # Before the unmount: the lock keeper lets go of its descriptors on it.
            await trio.to_thread.run_sync(self.store.detach_mount)

    def _grpc_server(self) -> GRPCServer:
        lease = self.config.lease
        backup = self.backup
        status = StatusService(
            self.store,
            NodeDescription(self.store.node_id, self.hostname, self.advertise_url, lease.type),
            partial(role_snapshot, self.cluster),
            backup=backup.report if backup is not None else lambda: None,
        )
        server = GRPCServer(
            self.config.grpc.listen_address,
            stream_handler=ReplicationService(self.cluster).stream,
            status_handler=status.reply,
        )
        AdminService(self.handoffs).register(server)
        return server

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


async def serve_extras(
    node: NodeView, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the optional services (proxy, metrics) until cancelled.

    `task_status.started()` is reported once every enabled listener is bound; a
    bad `proxy.*` / `metrics.addr` or a port in use raises (ConfigError /
    ListenError) before that, so the node fails to start with that message.
    """
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
