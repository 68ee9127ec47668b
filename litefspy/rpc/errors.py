"""The one table between litefspy exceptions and gRPC status codes."""

from __future__ import annotations

import enum
from typing import Any

import grpc
import trio

from litefspy.errors import ReplicationError


class Code(enum.Enum):
    """The status codes handlers may end an RPC with."""

    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INTERNAL = "INTERNAL"

    def to_grpc(self) -> Any:
        return getattr(grpc.StatusCode, self.value)


class RPCRefused(ReplicationError):
    """Raised by a trio-side handler: end the RPC with `code` and this message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(ReplicationError):
    """A gRPC call failed; `code` is the status code name (e.g. "UNAVAILABLE")."""

    def __init__(self, code: str, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        # The server's own message, when it answered (None when unreachable).
        self.details = details


def describe_rpc_error(exc: Any, url: str) -> RemoteError:
    """The RemoteError (with a one-line message) for a failed call to `url`."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE":
        return RemoteError(name, f"cannot reach litefspy node at {url} ({details or name})")
    if name == "DEADLINE_EXCEEDED":
        return RemoteError(name, f"litefspy node at {url} did not answer in time")
    return RemoteError(name, f"{url} failed the call: {details or name} ({name})", details)


# What a thread crossing into trio may hit when the trio side has gone away
# (its channel closed, its task cancelled, or the run ended).
TRIO_GONE = (
    trio.Cancelled,
    trio.RunFinishedError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)
