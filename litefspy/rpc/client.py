"""The client side: one channel helper and the calls built on it.

`open_stream` / `open_server_stream` serve trio callers: a worker thread
iterates the blocking response iterator and hands each message to trio through
a memory channel; leaving the context cancels the call, which unblocks that
thread. The other calls are blocking (for the CLI and worker threads).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import grpc
import trio

from litefspy.errors import LitefspyError, ReplicationError
from litefspy.rpc.errors import TRIO_GONE, describe_rpc_error
from litefspy.rpc.methods import (
    CHANNEL_DEPTH,
    DEFAULT_PORT,
    MESSAGE_LIMIT_OPTIONS,
    STATUS_METHOD,
    STREAM_METHOD,
    Frame,
)
from litefspy.v1 import admin_pb2, replication_pb2


def grpc_target(url: str) -> tuple[str, bool]:
    """`http://host:port` (or `host:port`) -> (`host:port`, tls)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https", "grpc"):
        raise LitefspyError(f"unsupported URL scheme in {url!r}: use http://HOST:PORT")
    if not parts.hostname:
        raise LitefspyError(f"no host in URL {url!r}: use http://HOST:PORT")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise LitefspyError(f"invalid port in URL {url!r}") from exc
    host = parts.hostname
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}", parts.scheme == "https"


def open_channel(url: str) -> Any:
    """A gRPC channel to the node at `url` (TLS for https://)."""
    target, tls = grpc_target(url)
    if tls:
        credentials = grpc.ssl_channel_credentials()
        return grpc.secure_channel(target, credentials, options=MESSAGE_LIMIT_OPTIONS)
    return grpc.insecure_channel(target, options=MESSAGE_LIMIT_OPTIONS)


class MessageStream:
    """Messages of one open server-streaming call, received in trio."""

    def __init__(self, recv: trio.MemoryReceiveChannel[Any], url: str):
        self._recv = recv
        self.url = url

    async def receive(self) -> Any:
        """The next message; ReplicationError when the stream fails or ends."""
        try:
            item = await self._recv.receive()
        except trio.EndOfChannel:
            raise ReplicationError(f"{self.url} closed the stream") from None
        if isinstance(item, ReplicationError):
            raise item
        return item


class FrameStream(MessageStream):
    """Frames of one open `Replication.Stream`."""

    async def receive(self) -> Frame:
        frame: Frame = await super().receive()
        return frame


@asynccontextmanager
async def open_stream(
    url: str, request: replication_pb2.StreamRequest
) -> AsyncIterator[FrameStream]:
    """Open `Replication.Stream` at `url`; leaving the block cancels the call."""
    async with open_server_stream(url, STREAM_METHOD, request, Frame) as stream:
        yield FrameStream(stream._recv, url)


@asynccontextmanager
async def open_server_stream(
    url: str, method: str, request: Any, response_type: Any
) -> AsyncIterator[MessageStream]:
    """Call server-streaming `method` at `url`; leaving the block cancels the call.

    The blocking iteration runs in a thread of its own (not a nursery task, so
    errors raised in the caller's block reach the caller unwrapped); cancelling
    the call on exit is what ends that thread.
    """
    token = trio.lowlevel.current_trio_token()
    channel = open_channel(url)
    call = channel.unary_stream(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )(request)
    send, recv = trio.open_memory_channel[Any](CHANNEL_DEPTH)

    def pump() -> None:
        final: ReplicationError | None = None
        try:
            for message in call:
                trio.from_thread.run(send.send, message, trio_token=token)
        except grpc.RpcError as exc:
            final = describe_rpc_error(exc, url)
        except TRIO_GONE:
            return  # the trio side left (recv closed) or the run ended
        try:
            if final is not None:
                trio.from_thread.run(send.send, final, trio_token=token)
            trio.from_thread.run_sync(send.close, trio_token=token)
        except TRIO_GONE:
            pass

    def done(outcome: object) -> None:
        del outcome  # pump handles everything it expects; see TRIO_GONE

    trio.lowlevel.start_thread_soon(pump, done, name=f"litefspy stream {method}")
    try:
        yield MessageStream(recv, url)
    finally:
        call.cancel()
        recv.close()
        channel.close()


class CallHandle:
    """A blocking server-streaming call the caller can cancel from another thread."""

    def __init__(self, url: str, method: str, request: Any, response_type: Any) -> None:
        self.url = url
        self._channel = open_channel(url)
        self._call = self._channel.unary_stream(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )(request)

    def __iter__(self) -> Iterator[Any]:
        """The responses; RemoteError on failure (also after `cancel`)."""
        try:
            yield from self._call
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, self.url) from None

    def cancel(self) -> None:
        """End the call (the server sees the client go away)."""
        self._call.cancel()
        self._channel.close()


def fetch_status(url: str, timeout: float = 5.0) -> admin_pb2.StatusReply:
    """Blocking `Admin.Status` call (for the CLI); RemoteError when unreachable."""
    reply: admin_pb2.StatusReply = call_unary(
        url, STATUS_METHOD, admin_pb2.StatusRequest(), admin_pb2.StatusReply, timeout
    )
    return reply


# ------------------------------------------------------------- generic client


def _invoke(url: str, make_stub: Callable[[Any], Any], payload: Any, timeout: float) -> Any:
    """Make one blocking call on a fresh channel; RemoteError on failure."""
    channel = open_channel(url)
    try:
        try:
            return make_stub(channel)(payload, timeout=timeout)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, url) from None
    finally:
        channel.close()


def call_unary(url: str, method: str, request: Any, response_type: Any, timeout: float) -> Any:
    """Blocking unary call of `method` ("/pkg.Service/Method"); RemoteError on failure."""
    return _invoke(
        url,
        lambda channel: channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        ),
        request,
        timeout,
    )


class Client:
    """A channel kept open for many blocking calls to one node (saves a connect each)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel = open_channel(url)

    def client_stream(
        self,
        method: str,
        requests: Iterator[Any],
        *,
        request_type: Any,
        response_type: Any,
        timeout: float,
    ) -> Any:
        """Blocking client-streaming call: sends every request, returns the one response."""
        stub = self._channel.stream_unary(
            method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return stub(requests, timeout=timeout)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, self.url) from None

    def close(self) -> None:
        self._channel.close()


def call_client_stream(
    url: str,
    method: str,
    requests: Iterator[Any],
    *,
    request_type: Any,
    response_type: Any,
    timeout: float,
) -> Any:
    """Blocking client-streaming call on a fresh channel (see Client.client_stream)."""
    client = Client(url)
    try:
        return client.client_stream(
            method,
            requests,
            request_type=request_type,
            response_type=response_type,
            timeout=timeout,
        )
    finally:
        client.close()


def call_server_stream(
    url: str, method: str, request: Any, response_type: Any, timeout: float | None = None
) -> Iterator[Any]:
    """Blocking server-streaming call: yields responses; RemoteError on failure."""
    channel = open_channel(url)
    try:
        stub = channel.unary_stream(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            yield from stub(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, url) from None
    finally:
        channel.close()


async def acall_unary(
    url: str, method: str, request: Any, response_type: Any, *, deadline: float
) -> Any:
    """`call_unary` from trio (in a worker thread, given up on cancellation).

    `deadline` is the gRPC call timeout in seconds.
    """
    return await trio.to_thread.run_sync(
        call_unary, url, method, request, response_type, deadline, abandon_on_cancel=True
    )
