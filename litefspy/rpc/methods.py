"""RPC method names (from the service descriptors) and shared channel settings."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass

# Imported for their descriptors: every litefspy.v1 service is in the pool.
from litefspy.v1 import admin_pb2, data_pb2, halt_pb2, replication_pb2

REPLICATION_SERVICE = replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
STREAM_METHOD = f"/{REPLICATION_SERVICE}/Stream"
STATUS_METHOD = f"/{ADMIN_SERVICE}/Status"
PROMOTE_METHOD = f"/{ADMIN_SERVICE}/Promote"
HANDOFF_METHOD = f"/{ADMIN_SERVICE}/Handoff"
DEFAULT_PORT = 20202
# Messages queued between the trio side and gRPC. Small: a frame can be 1 MiB.
CHANNEL_DEPTH = 2
# Both ends accept messages up to this size.
MESSAGE_LIMIT_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
]

Frame = replication_pb2.StreamFrame

_KINDS = {
    (False, False): "unary",
    (False, True): "server stream",
    (True, False): "client stream",
    (True, True): "bidirectional stream",
}
_SERVICES = (admin_pb2, data_pb2, halt_pb2, replication_pb2)


def describe_method(method: str) -> tuple[str, Any, Any] | None:
    """(kind, request class, response class) of "/pkg.Service/Method"; None if undeclared."""
    service, name = method.strip("/").split("/", 1)
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return None
    if found is None:
        return None
    kind = _KINDS[(found.client_streaming, found.server_streaming)]
    return kind, GetMessageClass(found.input_type), GetMessageClass(found.output_type)
