"""The Replication service: `Stream` goes to the primary's `ReplicationServer`.

The protocol itself is `litefspy.replication.server`; this handler only
decides whether this node serves it (it is the primary) or refuses, saying who is.
"""

from __future__ import annotations

import logging

import trio

from litefspy.cluster.roles import Cluster
from litefspy.logs import kv
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.methods import Frame
from litefspy.v1 import replication_pb2

log = logging.getLogger(__name__)


class ReplicationService:
    """`Replication.Stream` for one node's `Cluster` (the server's stream handler)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def stream(
        self,
        request: replication_pb2.StreamRequest,
        peer: str,
        send: trio.MemorySendChannel[Frame],
    ) -> None:
        """Serve the stream while this node is the primary; refuse it otherwise."""
        server = self.cluster.server
        if server is not None and self.cluster.is_primary():
            await server.stream(request, peer, send)
            return
        await trio.lowlevel.checkpoint()
        if request.node_id == self.cluster.store.node_id:
            log.error("refused a replication stream from this node itself %s", kv(peer=peer))
            raise RPCRefused(
                Code.FAILED_PRECONDITION,
                f"node {self.cluster.hostname} refuses to replicate from itself: "
                "lease.advertise-url must name the primary, not this node",
            )
        primary = self.cluster.primary_hostname()
        log.info(
            "refused a replication stream: this node is not the primary %s",
            kv(peer=peer, hostname=request.hostname),
        )
        raise RPCRefused(
            Code.FAILED_PRECONDITION,
            f"node {self.cluster.hostname} is not the primary"
            + (f" (the primary is {primary})" if primary else ""),
        )
