"""The composition root: builds the store, the FUSE layer, replication and the gRPC
server from the config, and runs them in one trio nursery.

Roles come from the lease. With `lease.type: static`, a node with
`lease.candidate: true` is the primary; any other node is a replica of the
primary that its `lease.advertise-url` names (as in LiteFS).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from litefspy.config import Config, split_host_port
from litefspy.errors import ConfigError
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.logs import kv
from litefspy.replication.bridge import Code, Frame, GRPCServer, RPCRefused
from litefspy.replication.client import ReplicaIdentity, ReplicationClient
from litefspy.replication.identity import load_cluster_id, new_cluster_id, save_cluster_id
from litefspy.replication.server import PrimaryIdentity, ReplicationServer
from litefspy.replication.status import NodeDescription, StatusService
from litefspy.store.store import Store
from litefspy.v1 import replication_pb2

log = logging.getLogger(__name__)

STATIC_EPOCH = 1
# How long replicas get to receive the End frame, and RPCs to finish, at shutdown.
SHUTDOWN_GRACE = 1.0


class Node:
    """One litefspy process: one store, one mount, one gRPC server, one role."""

    def __init__(self, config: Config) -> None:
        self.config = config
        lease = config.lease
        if lease.type != "static":
            raise ConfigError(
                f"{config.source}: lease.type {lease.type!r} is not supported by this version's "
                "node yet; use lease.type: static"
            )
        self.data_dir = Path(config.data.dir)
        self.store = Store(
            self.data_dir,
            compress=config.data.compress,
            strict_verify=config.strict_verify,
        )
        self.is_primary = lease.candidate
        port = split_host_port(config.grpc.addr)[1]
        # A static replica's advertise-url names the primary; its own URL is the default one.
        self.advertise_url = (
            lease.advertise_url if self.is_primary else f"http://{lease.hostname}:{port}"
        )
        self.cluster_id = load_cluster_id(self.data_dir)
        self.client: ReplicationClient | None = None
        if not self.is_primary:
            self.client = ReplicationClient(
                self.store,
                ReplicaIdentity(self.store.node_id, lease.hostname, self.advertise_url),
                primary_url=lease.advertise_url,
                data_dir=self.data_dir,
                cluster_id=self.cluster_id,
                reconnect_delay=lease.reconnect_delay,
            )
        self.ops = Operations(self.store, self.client)
        self.server: ReplicationServer | None = None
        self.ready = trio.Event()

    @property
    def role(self) -> str:
        return "primary" if self.is_primary else "replica"

    async def run(self, command: Sequence[str] | None = None) -> int:
        """Serve until SIGINT/SIGTERM (or until `command` exits); return the exit code."""
        self.store.open()
        if self.is_primary and self.cluster_id is None:
            self.cluster_id = new_cluster_id()
            save_cluster_id(self.data_dir, self.cluster_id)
            log.info("new cluster %s", kv(cluster=self.cluster_id))
        self.store.set_writable(self.is_primary)
        mountpoint = Path(self.config.fuse.dir)
        exit_code = 0
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
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
                    grpc_server = self._grpc_server()
                    await nursery.start(grpc_server.serve)
                    nursery.start_soon(
                        self.store.run_retention,
                        self.config.data.retention,
                        self.config.data.retention_monitor_interval,
                    )
                    # WAL commits under synchronous=NORMAL leave their LTX fsync to this.
                    nursery.start_soon(self.store.run_flusher)
                    if self.client is not None:
                        nursery.start_soon(self.client.run)
                    log.info(
                        "node ready %s",
                        kv(
                            role=self.role,
                            dir=mountpoint,
                            data=self.config.data.dir,
                            grpc=self.config.grpc.addr,
                            node=f"{self.store.node_id:016X}",
                        ),
                    )
                    self.ready.set()
                    if command:
                        if await self._wait_until_synced(signals):
                            exit_code = await self._supervise(command, signals)
                    else:
                        async for signum in signals:
                            log.info("shutting down %s", kv(signal=signal.Signals(signum).name))
                            break
                    await self._shutdown(grpc_server)
                    nursery.cancel_scope.cancel()
        finally:
            if self.server is not None:
                self.server.close()
            self.store.close()
        return exit_code

    def _grpc_server(self) -> GRPCServer:
        lease = self.config.lease
        if self.is_primary:
            assert self.cluster_id is not None
            self.server = ReplicationServer(
                self.store,
                PrimaryIdentity(self.store.node_id, lease.hostname, self.advertise_url),
                cluster_id=self.cluster_id,
                epoch=STATIC_EPOCH,
            )
            stream_handler = self.server.stream
        else:
            stream_handler = self._refuse_stream
        status = StatusService(
            self.store,
            NodeDescription(self.store.node_id, lease.hostname, self.advertise_url, lease.type),
            cluster_id=self.cluster_id or "",
            server=self.server,
            client=self.client,
            epoch=STATIC_EPOCH if self.is_primary else 0,
        )
        return GRPCServer(
            self.config.grpc.listen_address,
            stream_handler=stream_handler,
            status_handler=status.reply,
        )

    async def _refuse_stream(
        self,
        request: replication_pb2.StreamRequest,
        peer: str,
        send: trio.MemorySendChannel[Frame],
    ) -> None:
        del send
        await trio.lowlevel.checkpoint()
        if request.node_id == self.store.node_id:
            log.error("refused a replication stream from this node itself %s", kv(peer=peer))
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"node {self.config.lease.hostname} refuses to replicate from itself: "
                "lease.advertise-url must name the primary, not this node",
            )
        log.warning(
            "refused a replication stream: this node is a replica %s",
            kv(peer=peer, hostname=request.hostname),
        )
        raise RPCRefused(
            Code.FAILED_PRECONDITION,
            f"node {self.config.lease.hostname} is a replica, not the primary (its primary is "
            f"{self.config.lease.advertise_url})",
        )

    async def _shutdown(self, grpc_server: GRPCServer) -> None:
        with trio.CancelScope(shield=True):
            if self.server is not None:
                await self.server.shutdown("shutting down", grace=SHUTDOWN_GRACE)
            await grpc_server.stop(grace=SHUTDOWN_GRACE)

    async def _wait_until_synced(self, signals: AsyncIterator[int]) -> bool:
        """On a replica (unless skip-sync), wait for the first catch-up; False on a signal."""
        client = self.client
        if client is None or self.config.skip_sync:
            return True
        log.info("waiting to catch up with the primary before starting the command")
        synced = False
        async with trio.open_nursery() as nursery:

            async def wait_ready() -> None:
                nonlocal synced
                await client.ready.wait()
                synced = True
                nursery.cancel_scope.cancel()

            async def wait_signal() -> None:
                async for signum in signals:
                    log.info("shutting down %s", kv(signal=signal.Signals(signum).name))
                    break
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
