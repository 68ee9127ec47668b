"""The node's gRPC API: one module per protobuf service, handlers that parse, delegate, reply.

`admin` (Status), `data` (Import, Export), `events` (Events) and `halt` (write
forwarding). The Replication service's Stream lives in `litefspy.replication`.
"""

from __future__ import annotations

from litefspy.api.data import DataService
from litefspy.api.events import EventHub
from litefspy.api.halt import HaltService
from litefspy.cluster.view import NodeView
from litefspy.rpc.server import GRPCServer


def register_rpcs(node: NodeView, server: GRPCServer) -> None:
    """Add the services' RPCs to the node's gRPC server (called before it serves).

    `Data.Import` / `Data.Export` (litefspy.api.data), `Data.Events`
    (litefspy.api.events, which subscribes to the store and the role changes here)
    and the `Halt` service of write forwarding (litefspy.api.halt).
    """
    DataService(node).register(server)
    EventHub(node).register(server)
    HaltService(node).register(server)
