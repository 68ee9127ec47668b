"""The node's gRPC server, driven from trio.

`GRPCServer` runs a `grpc.server` on a thread pool. Each servicer method is a
short adapter: a server-streaming RPC starts a trio task (the stream handler)
in the server's nursery and yields the frames that task sends into a trio
memory channel, pulling them one at a time with `trio.from_thread.run`, so
gRPC's flow control reaches the handler as ordinary channel backpressure.
When the client goes away, gRPC's termination callback cancels the task.
A unary RPC runs its handler on the trio loop and returns the reply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import trio

from litefspy.errors import LitefspyError
from litefspy.logs import kv
from litefspy.rpc.errors import TRIO_GONE, Code, RPCRefused
from litefspy.rpc.methods import (
    CHANNEL_DEPTH,
    MESSAGE_LIMIT_OPTIONS,
    STATUS_METHOD,
    STREAM_METHOD,
    Frame,
    describe_method,
)
from litefspy.v1 import admin_pb2, replication_pb2

log = logging.getLogger(__name__)
# grpc logs a traceback when a message does not deserialize; the RPC then fails
# with INTERNAL and litefspy logs that failure itself, in one line.
logging.getLogger("grpc._common").setLevel(logging.CRITICAL)

# One thread per open stream plus unary calls; replicas beyond this wait.
MAX_WORKERS = 64

_SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default, which would let a second node silently
    # share (and steal connections from) this node's port.
    ("grpc.so_reuseport", 0),
    *MESSAGE_LIMIT_OPTIONS,
]


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
        # Every RPC served: service name -> method name -> grpc method handler.
        self._methods: dict[str, dict[str, Any]] = {}
        self.add_server_stream(STREAM_METHOD, stream_handler)
        # Status answers also while starting, and reports failures as INTERNAL.
        self._register(
            STATUS_METHOD,
            grpc.unary_unary_rpc_method_handler(
                self._status,
                request_deserializer=admin_pb2.StatusRequest.FromString,
                response_serializer=admin_pb2.StatusReply.SerializeToString,
            ),
        )

    # ------------------------------------------------ generic registration
    #
    # Other modules add RPCs without importing grpc: `method` is the full name
    # "/package.Service/Method" and the handlers are trio functions; the message
    # classes come from the litefspy.v1 descriptors (given explicitly only for a
    # method the .proto files do not declare). Register before `serve`.

    def _register(self, method: str, handler: Any) -> None:
        service, name = method.strip("/").split("/", 1)
        self._methods.setdefault(service, {})[name] = handler

    @staticmethod
    def _types(method: str, kind: str, request_type: Any, response_type: Any) -> tuple[Any, Any]:
        """The message classes of `method`: from the .proto descriptors when it is
        declared there (its kind must match), else as given (tests' own methods)."""
        declared = describe_method(method)
        if declared is None:
            if request_type is None or response_type is None:
                raise ValueError(f"{method} is not declared in litefspy.v1: give its types")
            return request_type, response_type
        declared_kind, request_cls, response_cls = declared
        if declared_kind != kind:
            raise ValueError(f"{method} is a {declared_kind} RPC, registered as a {kind}")
        if request_type not in (None, request_cls) or response_type not in (None, response_cls):
            raise ValueError(f"{method} takes {request_cls.__name__} -> {response_cls.__name__}")
        return request_cls, response_cls

    def add_unary(
        self,
        method: str,
        handler: Callable[[Any], Awaitable[Any]],
        request_type: Any = None,
        response_type: Any = None,
    ) -> None:
        """Serve a unary RPC with `await handler(request) -> response`."""
        request_type, response_type = self._types(method, "unary", request_type, response_type)

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
        request_type: Any = None,
        response_type: Any = None,
    ) -> None:
        """Serve a server-streaming RPC: `await handler(request, peer, send)` sends responses."""
        request_type, response_type = self._types(
            method, "server stream", request_type, response_type
        )

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
        request_type: Any = None,
        response_type: Any = None,
    ) -> None:
        """Serve a client-streaming RPC: `await handler(receive, peer) -> response`."""
        request_type, response_type = self._types(
            method, "client stream", request_type, response_type
        )

        def servicer(requests: Iterator[Any], context: Any) -> Any:
            token = self._token
            assert token is not None
            send, recv = trio.open_memory_channel[Any](CHANNEL_DEPTH)
            peer = str(context.peer())

            def feed() -> None:
                try:
                    for item in requests:
                        trio.from_thread.run(send.send, item, trio_token=token)
                except TRIO_GONE:
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
            tuple(
                grpc.method_handlers_generic_handler(service, methods)
                for service, methods in self._methods.items()
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

    def _serve_stream(self, request: Any, context: Any, handler: Any) -> Iterator[Any]:
        """Run `handler` as a trio task and yield what it sends (a gRPC pool thread)."""
        self._refuse_while_starting(context)
        token = self._token
        assert token is not None
        send, recv = trio.open_memory_channel[Frame | _Failure](CHANNEL_DEPTH)
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
