"""The one module that imports grpc (DESIGN.md decision 8).

grpcio speaks threads (and asyncio), litefspy speaks trio. This module keeps the
seam narrow:

* `GRPCServer` runs a `grpc.server` on a thread pool. Each servicer method is a
  short adapter: a server-streaming RPC starts a trio task (the stream handler)
  in the server's nursery and yields the frames that task sends into a trio
  memory channel, pulling them one at a time with `trio.from_thread.run`, so
  gRPC's flow control reaches the handler as ordinary channel backpressure.
  When the client goes away, gRPC's termination callback cancels the task.
  A unary RPC runs its handler on the trio loop and returns the reply.
* `open_stream` is the client side: a worker thread iterates the blocking
  response iterator and hands each frame to trio through a memory channel;
  leaving the context cancels the call, which unblocks that thread.

Handlers on the trio side never see grpc types; they raise `RPCRefused` to end
an RPC with a status code and a one-line message.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

# grpc's C core logs connection events (GOAWAY, ...) to stderr at INFO unless told
# otherwise; litefspy reports what matters through its own logs.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from litefspy.errors import LitefspyError, ReplicationError
from litefspy.logs import kv
from litefspy.v1 import admin_pb2, replication_pb2

log = logging.getLogger(__name__)
# grpc logs a traceback when a message does not deserialize; the RPC then fails
# with INTERNAL and litefspy logs that failure itself, in one line.
logging.getLogger("grpc._common").setLevel(logging.CRITICAL)

_REPLICATION = replication_pb2.DESCRIPTOR.services_by_name["Replication"].full_name
_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
STREAM_METHOD = f"/{_REPLICATION}/Stream"
STATUS_METHOD = f"/{_ADMIN}/Status"
DEFAULT_PORT = 20202
# Frames queued between the trio side and gRPC. Small: a frame can be 1 MiB.
_CHANNEL_DEPTH = 2
# One thread per open stream plus unary calls; replicas beyond this wait.
MAX_WORKERS = 64

_SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default, which would let a second node silently
    # share (and steal connections from) this node's port.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
]
_CLIENT_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
]


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


Frame = replication_pb2.StreamFrame


class StreamHandler(Protocol):
    """Trio side of `Replication.Stream`: send frames until done (or cancelled)."""

    async def __call__(
        self,
        request: replication_pb2.StreamRequest,
        peer: str,
        send: trio.MemorySendChannel[Frame],
    ) -> None: ...


StatusHandler = Callable[[], Awaitable[admin_pb2.StatusReply]]


@dataclass
class _Failure:
    code: Code
    message: str


class _StreamTask:
    """Links one gRPC stream to its trio task, so either side can end the other."""

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Trio thread only."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


# ------------------------------------------------------------------ addresses


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


def _channel(url: str) -> Any:
    target, tls = grpc_target(url)
    if tls:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=_CLIENT_OPTIONS)
    return grpc.insecure_channel(target, options=_CLIENT_OPTIONS)


def _describe_rpc_error(exc: Any, url: str) -> RemoteError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE":
        return RemoteError(name, f"cannot reach litefspy node at {url} ({details or name})")
    if name == "DEADLINE_EXCEEDED":
        return RemoteError(name, f"litefspy node at {url} did not answer in time")
    return RemoteError(name, f"{url} failed the call: {details or name} ({name})", details)


# --------------------------------------------------------------------- server


class GRPCServer:
    """The node's gRPC server (replication + admin), driven from trio.

    Run `serve` with `nursery.start`: it binds (raising LitefspyError if the
    address is taken), reports started, and serves until cancelled or `stop`.
    """

    def __init__(
        self,
        address: str,
        *,
        stream_handler: StreamHandler,
        status_handler: StatusHandler,
        max_workers: int = MAX_WORKERS,
    ) -> None:
        self.address = address
        self._stream_handler = stream_handler
        self._status_handler = status_handler
        self._max_workers = max_workers
        self._server: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._tasks: set[_StreamTask] = set()
        self.port = 0
        # While set (the node checks its databases at startup), every RPC but
        # Status answers UNAVAILABLE with this reason.
        self.starting: str | None = None
        # Services registered with add_unary / add_server_stream / add_client_stream:
        # service name -> method name -> grpc method handler.
        self._extra: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------ generic registration
    #
    # Other modules add RPCs without importing grpc: `method` is the full name
    # "/package.Service/Method", the types are protobuf message classes, and the
    # handlers are trio functions. Register before `serve`.

    def _register(self, method: str, handler: Any) -> None:
        service, name = method.strip("/").split("/", 1)
        self._extra.setdefault(service, {})[name] = handler

    def add_unary(
        self,
        method: str,
        handler: Callable[[Any], Awaitable[Any]],
        request_type: Any,
        response_type: Any,
    ) -> None:
        """Serve a unary RPC with `await handler(request) -> response`."""

        def servicer(request: Any, context: Any) -> Any:
            return self._run_unary(lambda: handler(request), context)

        self._register(
            method,
            grpc.unary_unary_rpc_method_handler(
                servicer,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            ),
        )

    def add_server_stream(
        self,
        method: str,
        handler: Callable[[Any, str, trio.MemorySendChannel[Any]], Awaitable[None]],
        request_type: Any,
        response_type: Any,
    ) -> None:
        """Serve a server-streaming RPC: `await handler(request, peer, send)` sends responses."""

        def servicer(request: Any, context: Any) -> Iterator[Any]:
            return self._serve_stream(request, context, handler)

        self._register(
            method,
            grpc.unary_stream_rpc_method_handler(
                servicer,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            ),
        )

    def add_client_stream(
        self,
        method: str,
        handler: Callable[[trio.MemoryReceiveChannel[Any], str], Awaitable[Any]],
        request_type: Any,
        response_type: Any,
    ) -> None:
        """Serve a client-streaming RPC: `await handler(receive, peer) -> response`."""

        def servicer(requests: Iterator[Any], context: Any) -> Any:
            token = self._token
            assert token is not None
            send, recv = trio.open_memory_channel[Any](_CHANNEL_DEPTH)
            peer = str(context.peer())

            def feed() -> None:
                try:
                    for item in requests:
                        trio.from_thread.run(send.send, item, trio_token=token)
                except _GONE:
                    return
                except grpc.RpcError:
                    pass  # the client went away: the handler sees the channel end early
                self._call_trio(send.close)

            feeder = threading.Thread(target=feed, name="litefspy client stream", daemon=True)
            feeder.start()
            try:
                return self._run_unary(lambda: handler(recv, peer), context)
            finally:
                self._call_trio(recv.close)

        self._register(
            method,
            grpc.stream_unary_rpc_method_handler(
                servicer,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            ),
        )

    def _refuse_while_starting(self, context: Any) -> None:
        starting = self.starting
        if starting is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"node is starting: {starting}")

    def _run_unary(self, call: Callable[[], Awaitable[Any]], context: Any) -> Any:
        self._refuse_while_starting(context)
        token = self._token
        assert token is not None
        try:
            return trio.from_thread.run(call, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
            raise
        except RPCRefused as exc:
            context.abort(exc.code.to_grpc(), str(exc))
            raise
        except LitefspyError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, start, serve until cancelled; always stops the gRPC server."""
        self._token = trio.lowlevel.current_trio_token()
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="grpc"),
            options=_SERVER_OPTIONS,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    _REPLICATION,
                    {
                        "Stream": grpc.unary_stream_rpc_method_handler(
                            self._stream,
                            request_deserializer=replication_pb2.StreamRequest.FromString,
                            response_serializer=Frame.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    _ADMIN,
                    {
                        "Status": grpc.unary_unary_rpc_method_handler(
                            self._status,
                            request_deserializer=admin_pb2.StatusRequest.FromString,
                            response_serializer=admin_pb2.StatusReply.SerializeToString,
                        ),
                        **self._extra.pop(_ADMIN, {}),
                    },
                ),
                *(
                    grpc.method_handlers_generic_handler(service, methods)
                    for service, methods in self._extra.items()
                ),
            )
        )
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            self.port = 0
            detail = f" ({exc})"
        else:
            detail = ""
        if not self.port:
            server.stop(None)
            raise LitefspyError(
                f"cannot listen on grpc.addr {self.address}{detail}: is another node "
                "using the port? Change grpc.addr in fuse.yml"
            )
        self._server = server
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                server.start()
                log.info("gRPC listening %s", kv(addr=self.address))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._stop_server(grace=0.5)

    async def stop(self, grace: float = 1.0) -> None:
        """End every stream task, then stop the server (waiting `grace` for RPCs)."""
        for task in list(self._tasks):
            task.cancel()
        await self._stop_server(grace)

    async def _stop_server(self, grace: float) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        for task in list(self._tasks):
            task.cancel()
        done: threading.Event = server.stop(grace)
        await trio.to_thread.run_sync(done.wait, grace + 5.0)
        log.info("gRPC stopped %s", kv(addr=self.address))

    # ---------------------------------------------------------- gRPC threads

    def _stream(self, request: replication_pb2.StreamRequest, context: Any) -> Iterator[Frame]:
        """Servicer of Replication.Stream (a gRPC pool thread)."""
        return self._serve_stream(request, context, self._stream_handler)

    def _serve_stream(self, request: Any, context: Any, handler: Any) -> Iterator[Any]:
        """Run `handler` as a trio task and yield what it sends (a gRPC pool thread)."""
        self._refuse_while_starting(context)
        token = self._token
        assert token is not None
        send, recv = trio.open_memory_channel[Frame | _Failure](_CHANNEL_DEPTH)
        task = _StreamTask()
        peer = str(context.peer())
        try:
            trio.from_thread.run_sync(
                self._spawn, handler, request, peer, send, task, trio_token=token
            )
        except (trio.RunFinishedError, RuntimeError):
            context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")

        def on_done() -> None:
            self._call_trio(task.cancel)

        if not context.add_callback(on_done):
            on_done()
        try:
            while True:
                try:
                    item = trio.from_thread.run(recv.receive, trio_token=token)
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                except (trio.RunFinishedError, trio.Cancelled):
                    context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
                    return
                if isinstance(item, _Failure):
                    context.abort(item.code.to_grpc(), item.message)
                    return
                yield item
        finally:
            self._call_trio(task.cancel)
            self._call_trio(recv.close)

    def _call_trio(self, fn: Callable[[], object]) -> None:
        token = self._token
        if token is None:
            return
        try:
            trio.from_thread.run_sync(fn, trio_token=token)
        except (trio.RunFinishedError, RuntimeError):
            pass

    def _spawn(
        self,
        handler: Any,
        request: Any,
        peer: str,
        send: trio.MemorySendChannel[Any],
        task: _StreamTask,
    ) -> None:
        if self._nursery is None:
            raise RuntimeError("server is not running")
        self._nursery.start_soon(self._run_stream, handler, request, peer, send, task)

    async def _run_stream(
        self,
        handler: Any,
        request: Any,
        peer: str,
        send: trio.MemorySendChannel[Any],
        task: _StreamTask,
    ) -> None:
        self._tasks.add(task)
        try:
            async with send:
                with trio.CancelScope() as scope:
                    task.scope = scope
                    if task.cancelled:
                        scope.cancel()
                    failure: _Failure | None = None
                    try:
                        await handler(request, peer, send)
                    except RPCRefused as exc:
                        failure = _Failure(exc.code, str(exc))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the replica went away
                    except LitefspyError as exc:
                        failure = _Failure(Code.INTERNAL, str(exc))
                    except Exception as exc:
                        log.exception("server stream failed %s", kv(peer=peer))
                        failure = _Failure(Code.INTERNAL, f"stream failed: {exc}")
                    if failure is not None:
                        try:
                            await send.send(failure)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
        finally:
            self._tasks.discard(task)

    def _status(self, request: admin_pb2.StatusRequest, context: Any) -> admin_pb2.StatusReply:
        """Servicer of Admin.Status (a gRPC pool thread)."""
        del request
        token = self._token
        assert token is not None
        try:
            return trio.from_thread.run(self._status_handler, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
            raise
        except LitefspyError as exc:
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
            raise


# --------------------------------------------------------------------- client


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
    channel = _channel(url)
    call = channel.unary_stream(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )(request)
    send, recv = trio.open_memory_channel[Any](_CHANNEL_DEPTH)

    def pump() -> None:
        final: ReplicationError | None = None
        try:
            for message in call:
                trio.from_thread.run(send.send, message, trio_token=token)
        except grpc.RpcError as exc:
            final = _describe_rpc_error(exc, url)
        except _GONE:
            return  # the trio side left (recv closed) or the run ended
        try:
            if final is not None:
                trio.from_thread.run(send.send, final, trio_token=token)
            trio.from_thread.run_sync(send.close, trio_token=token)
        except _GONE:
            pass

    def done(outcome: object) -> None:
        del outcome  # pump handles everything it expects; see _GONE

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
        self._channel = _channel(url)
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
            raise _describe_rpc_error(exc, self.url) from None

    def cancel(self) -> None:
        """End the call (the server sees the client go away)."""
        self._call.cancel()
        self._channel.close()


_GONE = (
    trio.Cancelled,
    trio.RunFinishedError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def fetch_status(url: str, timeout: float = 5.0) -> admin_pb2.StatusReply:
    """Blocking `Admin.Status` call (for the CLI); RemoteError when unreachable."""
    channel = _channel(url)
    try:
        method = channel.unary_unary(
            STATUS_METHOD,
            request_serializer=admin_pb2.StatusRequest.SerializeToString,
            response_deserializer=admin_pb2.StatusReply.FromString,
        )
        try:
            reply: admin_pb2.StatusReply = method(admin_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _describe_rpc_error(exc, url) from None
        return reply
    finally:
        channel.close()


# ------------------------------------------------------------- generic client


def _invoke(url: str, make_stub: Callable[[Any], Any], payload: Any, timeout: float) -> Any:
    """Make one blocking call on a fresh channel; RemoteError on failure."""
    channel = _channel(url)
    try:
        try:
            return make_stub(channel)(payload, timeout=timeout)
        except grpc.RpcError as exc:
            raise _describe_rpc_error(exc, url) from None
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
        self._channel = _channel(url)

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
            raise _describe_rpc_error(exc, self.url) from None

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
    channel = _channel(url)
    try:
        stub = channel.unary_stream(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            yield from stub(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _describe_rpc_error(exc, url) from None
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
