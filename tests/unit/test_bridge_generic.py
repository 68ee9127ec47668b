"""The bridge's generic RPC registration: unary, server stream, client stream."""

from __future__ import annotations

import pytest
import trio

from litefspy.rpc.client import acall_unary, call_client_stream, call_server_stream, call_unary
from litefspy.rpc.errors import Code, RemoteError, RPCRefused
from litefspy.rpc.server import GRPCServer
from litefspy.v1.replication_pb2 import Heartbeat, Position
from tests.support.nodes import free_port

SERVICE = "/litefspy.test.Echo/"


async def _never(*_args: object) -> None:
    raise RPCRefused(Code.UNAVAILABLE, "not used")


async def test_generic_rpcs_round_trip() -> None:
    port = free_port()
    server = GRPCServer(f"127.0.0.1:{port}", stream_handler=_never, status_handler=_never)

    async def double(req: Heartbeat) -> Heartbeat:
        if req.unix_ms < 0:
            raise RPCRefused(Code.FAILED_PRECONDITION, "negative values are refused")
        return Heartbeat(unix_ms=req.unix_ms * 2)

    async def count_up(req: Heartbeat, peer: str, send: trio.MemorySendChannel) -> None:
        assert peer
        for i in range(req.unix_ms):
            await send.send(Position(name=f"p{i}", txid=i))

    async def total(recv: trio.MemoryReceiveChannel, peer: str) -> Heartbeat:
        acc = 0
        async for item in recv:
            acc += item.txid
        return Heartbeat(unix_ms=acc)

    server.add_unary(SERVICE + "Double", double, Heartbeat, Heartbeat)
    server.add_server_stream(SERVICE + "CountUp", count_up, Heartbeat, Position)
    server.add_client_stream(SERVICE + "Total", total, Position, Heartbeat)
    url = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)

        reply = await acall_unary(
            url, SERVICE + "Double", Heartbeat(unix_ms=21), Heartbeat, deadline=5
        )
        assert reply.unix_ms == 42
        with pytest.raises(RemoteError, match="negative values are refused"):
            await trio.to_thread.run_sync(
                call_unary, url, SERVICE + "Double", Heartbeat(unix_ms=-1), Heartbeat, 5.0
            )

        def stream() -> list[int]:
            return [
                p.txid
                for p in call_server_stream(
                    url, SERVICE + "CountUp", Heartbeat(unix_ms=5), Position, 5.0
                )
            ]

        assert await trio.to_thread.run_sync(stream) == [0, 1, 2, 3, 4]

        def upload() -> int:
            reqs = (Position(name="x", txid=i) for i in range(1, 101))
            return int(
                call_client_stream(
                    url,
                    SERVICE + "Total",
                    reqs,
                    request_type=Position,
                    response_type=Heartbeat,
                    timeout=5.0,
                ).unix_ms
            )

        assert await trio.to_thread.run_sync(upload) == 5050
        nursery.cancel_scope.cancel()


async def test_while_starting_only_status_answers() -> None:
    """A node checking its databases at startup answers Status; every other RPC is
    UNAVAILABLE with the reason until it is done."""
    from litefspy.rpc.client import fetch_status
    from litefspy.v1.admin_pb2 import StatusReply

    port = free_port()

    async def status() -> StatusReply:
        return StatusReply(role="waiting", not_ready_reason="starting: checking its databases")

    server = GRPCServer(f"127.0.0.1:{port}", stream_handler=_never, status_handler=status)

    async def echo(req: Heartbeat) -> Heartbeat:
        return req

    async def count_up(req: Heartbeat, peer: str, send: trio.MemorySendChannel) -> None:
        await send.send(Position(name="p", txid=1))

    server.add_unary(SERVICE + "Echo", echo, Heartbeat, Heartbeat)
    server.add_server_stream(SERVICE + "CountUp", count_up, Heartbeat, Position)
    server.starting = "checking its databases"
    url = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        reply = await trio.to_thread.run_sync(fetch_status, url, 5.0)
        assert reply.not_ready_reason == "starting: checking its databases"
        with pytest.raises(RemoteError, match="node is starting: checking its databases") as info:
            await acall_unary(url, SERVICE + "Echo", Heartbeat(unix_ms=7), Heartbeat, deadline=5)
        assert info.value.code == "UNAVAILABLE"
        with pytest.raises(RemoteError, match="node is starting"):
            await trio.to_thread.run_sync(
                lambda: list(
                    call_server_stream(url, SERVICE + "CountUp", Heartbeat(), Position, 5.0)
                )
            )
        server.starting = None
        reply = await acall_unary(
            url, SERVICE + "Echo", Heartbeat(unix_ms=7), Heartbeat, deadline=5
        )
        assert reply.unix_ms == 7
        nursery.cancel_scope.cancel()


def test_declared_methods_take_their_types_and_kind_from_the_descriptors() -> None:
    from litefspy.rpc.methods import HANDOFF_METHOD, STATUS_METHOD, describe_method
    from litefspy.v1 import admin_pb2

    assert describe_method(STATUS_METHOD) == (
        "unary",
        admin_pb2.StatusRequest,
        admin_pb2.StatusReply,
    )
    assert describe_method(SERVICE + "Double") is None
    server = GRPCServer("127.0.0.1:0", stream_handler=_never, status_handler=_never)
    with pytest.raises(ValueError, match="is a unary RPC, registered as a server stream"):
        server.add_server_stream(HANDOFF_METHOD, _never)
    with pytest.raises(ValueError, match="takes HandoffRequest -> HandoffReply"):
        server.add_unary(HANDOFF_METHOD, _never, Heartbeat, Heartbeat)
    with pytest.raises(ValueError, match=r"not declared in litefspy\.v1"):
        server.add_unary(SERVICE + "Double", _never)
