"""The HTTP proxy over real sockets: a stdlib HTTP app in a thread, a fake node state."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket

from litefspy.config import ProxyConfig
from litefspy.errors import ConfigError
from litefspy.proxy import ListenError, TxidWaiters, serve_proxy

DB = "app.db"


class FakeState:
    """A ProxyState whose TXIDs the app thread (or the test) advances."""

    def __init__(self, *, primary: bool = True, hostname: str | None = "primary-host") -> None:
        self.primary = primary
        self.hostname = hostname
        self.proxy_url: str | None = None
        self.lag = 0.0
        self.ready: tuple[bool, str] = (True, "")
        self._txids: dict[str, int] = {}
        self._lock = threading.Lock()
        self.waiters = TxidWaiters(self.txid)

    def is_primary(self) -> bool:
        return self.primary

    def primary_hostname(self) -> str | None:
        return self.hostname

    def primary_proxy_url(self) -> str | None:
        return self.proxy_url

    def no_primary_reason(self) -> str:
        return "no node holds the lease right now"

    def txid(self, db: str) -> int:
        return self._txids.get(db, 0)

    async def wait_for_txid(self, db: str, txid: int) -> None:
        await self.waiters.wait_for_txid(db, txid)

    def lag_seconds(self) -> float:
        return self.lag

    def readiness(self) -> tuple[bool, str]:
        return self.ready

    def commit(self, db: str = DB) -> int:
        """One more transaction (callable from any thread)."""
        with self._lock:
            self._txids[db] = self._txids.get(db, 0) + 1
            txid = self._txids[db]
        self.waiters.notify()
        return txid

    def set_txid(self, db: str, txid: int) -> None:
        with self._lock:
            self._txids[db] = txid
        self.waiters.notify()


class App:
    """A real HTTP/1.1 app (stdlib http.server) on a free loopback port."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.hits: list[dict[str, Any]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                app.handle(self)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> App:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    @staticmethod
    def read_body(req: BaseHTTPRequestHandler) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(req.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    req.rfile.readline()
                    return b"".join(parts)
                parts.append(req.rfile.read(size))
                req.rfile.readline()
        return req.rfile.read(int(req.headers.get("Content-Length") or 0))

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        body = self.read_body(req)
        hit = {
            "method": req.command,
            "path": req.path,
            "headers": [[k.lower(), v] for k, v in req.headers.items()],
            "body_len": len(body),
            "body_sha": hashlib.sha256(body).hexdigest(),
        }
        self.hits.append(hit)
        if req.path.startswith("/write"):
            hit["txid"] = self.state.commit()
        if req.path == "/stream":
            req.send_response(200)
            req.send_header("Content-Type", "text/plain")
            req.send_header("Transfer-Encoding", "chunked")
            req.end_headers()
            for i in range(5):
                piece = f"part-{i}\n".encode()
                req.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                req.wfile.flush()
                time.sleep(0.02)
            req.wfile.write(b"0\r\n\r\n")
            return
        if req.path == "/download":
            data = bytes(range(256)) * 8192  # 2 MiB
            req.send_response(200)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
            return
        out = json.dumps(hit).encode()
        req.send_response(201 if req.command == "POST" else 200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(out)))
        req.send_header("X-App", "yes")
        req.send_header("Set-Cookie", "session=abc; Path=/")
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def app(state: FakeState) -> Iterator[App]:
    with App(state) as app:
        yield app


def proxy_config(target_port: int, **kwargs: Any) -> ProxyConfig:
    return ProxyConfig(addr="127.0.0.1:0", target=f"127.0.0.1:{target_port}", db=DB, **kwargs)


@asynccontextmanager
async def running_proxy(
    config: ProxyConfig, state: FakeState, **kwargs: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """Serve the proxy; yield a client bound to it (no cookie jar surprises: see `fresh`)."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_proxy, config, state, **kwargs))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:
            yield c
        nursery.cancel_scope.cancel()


def cookie(txid: int) -> dict[str, str]:
    return {"Cookie": f"__txid={txid:016x}"}


def header_pairs(hit: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in hit["headers"]}


# ------------------------------------------------------------------ reads


async def test_read_without_cookie_goes_to_app(app: App, state: FakeState) -> None:
    async with running_proxy(proxy_config(app.port), state) as client:
        r = await client.get(
            "/hello%20there?q=1&r=2",
            headers={
                "Host": "myapp.example",
                "X-Forwarded-For": "203.0.113.7",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "secret",
            },
        )
    assert r.status_code == 200
    assert r.headers["x-app"] == "yes"
    hit = r.json()
    assert hit["method"] == "GET"
    assert hit["path"] == "/hello%20there?q=1&r=2"
    headers = header_pairs(hit)
    assert headers["host"] == "myapp.example"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert "x-hop" not in headers
    assert "connection" not in headers or "x-hop" not in headers["connection"].lower()
    assert r.headers.get_list("set-cookie") == ["session=abc; Path=/"]  # reads get no __txid


async def test_read_waits_until_the_cookie_txid_is_replicated(app: App, state: FakeState) -> None:
    state.set_txid(DB, 3)
    async with running_proxy(proxy_config(app.port), state) as client:

        async def replicate_later() -> None:
            await trio.sleep(0.3)
            state.set_txid(DB, 4)
            await trio.sleep(0.3)
            # from another thread, as a replication apply might
            await trio.to_thread.run_sync(state.set_txid, DB, 5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replicate_later)
            start = trio.current_time()
            r = await client.get("/after-write", headers=cookie(5))
            waited = trio.current_time() - start
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/after-write"
    assert 0.5 <= waited < 2.0


async def test_read_with_txid_already_reached_does_not_wait(app: App, state: FakeState) -> None:
    state.set_txid(DB, 9)
    async with running_proxy(proxy_config(app.port), state) as client:
        start = trio.current_time()
        r = await client.get("/", headers=cookie(7))
        assert r.status_code == 200
        assert trio.current_time() - start < 0.5
        # an unparsable cookie is ignored, as LiteFS does
        r = await client.get("/", headers={"Cookie": "__txid=nothex"})
        assert r.status_code == 200


async def test_read_times_out_with_504(app: App, state: FakeState) -> None:
    state.set_txid(DB, 2)
    async with running_proxy(proxy_config(app.port), state, txid_timeout=0.4) as client:
        start = trio.current_time()
        r = await client.get("/page", headers=cookie(0x10))
        waited = trio.current_time() - start
    assert r.status_code == 504
    assert "proxy timeout" in r.text
    assert "0000000000000002" in r.text and "0000000000000010" in r.text
    assert 0.4 <= waited < 2.0
    assert app.hits == []


async def test_head_request(app: App, state: FakeState) -> None:
    async with running_proxy(proxy_config(app.port), state) as client:
        r = await client.head("/thing")
        assert r.status_code == 200
        assert r.content == b""
        assert int(r.headers["content-length"]) > 0
        # the connection stays usable after a HEAD
        r = await client.get("/next")
        assert r.json()["path"] == "/next"


async def test_streamed_and_large_responses(app: App, state: FakeState) -> None:
    async with running_proxy(proxy_config(app.port), state) as client:
        async with client.stream("GET", "/stream") as r:
            assert r.status_code == 200
            text = b"".join([chunk async for chunk in r.aiter_bytes()]).decode()
        assert text == "".join(f"part-{i}\n" for i in range(5))
        r = await client.get("/download")
        assert r.content == bytes(range(256)) * 8192


# ----------------------------------------------------------------- writes


async def test_write_on_primary_sets_txid_cookie(app: App, state: FakeState) -> None:
    state.set_txid(DB, 0x41)
    body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4
    async with running_proxy(proxy_config(app.port), state) as client:
        r = await client.post("/write/item", content=body)
        assert r.status_code == 201
        hit = r.json()
        assert hit["txid"] == 0x42
        assert hit["body_len"] == len(body)
        assert hit["body_sha"] == hashlib.sha256(body).hexdigest()
        cookies = r.headers.get_list("set-cookie")
        assert "session=abc; Path=/" in cookies  # the app's own cookie survives
        assert "__txid=0000000000000042; Path=/; Max-Age=5; HttpOnly" in cookies

        # a streamed (chunked) upload reaches the app intact too
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(20):
                yield f"chunk {i};".encode()

        r = await client.put("/write/streamed", content=chunks())
        assert r.status_code == 200
        expect = b"".join(f"chunk {i};".encode() for i in range(20))
        assert r.json()["body_sha"] == hashlib.sha256(expect).hexdigest()
        assert "__txid=0000000000000043" in r.headers["set-cookie"]


async def test_write_on_replica_answers_fly_replay(app: App) -> None:
    state = FakeState(primary=False, hostname="node-a")
    async with running_proxy(proxy_config(app.port), state) as client:
        r = await client.post("/write/x", content=b"x" * 10000)
        assert r.status_code == 200
        assert r.headers["fly-replay"] == "instance=node-a"
        assert r.content == b""
        assert "set-cookie" not in r.headers
        r = await client.delete("/thing")
        assert r.headers["fly-replay"] == "instance=node-a"
        # reads on the replica still reach the app on the same connection
        r = await client.get("/read")
        assert r.json()["path"] == "/read"
    assert [h["path"] for h in app.hits] == ["/read"]


async def test_write_on_replica_without_primary_is_503(app: App) -> None:
    state = FakeState(primary=False, hostname=None)
    async with running_proxy(proxy_config(app.port), state) as client:
        r = await client.post("/write")
    assert r.status_code == 503
    assert "no primary" in r.text
    assert app.hits == []


async def test_replica_forwards_writes_to_the_primary_proxy(app: App, state: FakeState) -> None:
    """proxy.forward: the replica relays writes to the primary's proxy and its answer back."""
    replica_state = FakeState(primary=False, hostname="primary-host")
    async with (
        running_proxy(proxy_config(app.port), state) as primary,
        running_proxy(proxy_config(free_port(), forward=True), replica_state) as replica,
    ):
        replica_state.proxy_url = str(primary.base_url).rstrip("/")
        r = await replica.post(
            "/write/fwd?x=1", content=b"payload", headers={"Host": "myapp.example"}
        )
        assert r.status_code == 201, r.text
        hit = r.json()
        assert hit["path"] == "/write/fwd?x=1"
        assert hit["body_len"] == len(b"payload")
        headers = header_pairs(hit)
        assert headers["host"] == "myapp.example"
        assert headers["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"
        assert "litefspy-forwarded" not in headers
        assert f"__txid={hit['txid']:016x}" in r.headers["set-cookie"]
        assert "fly-replay" not in r.headers

        # no primary proxy known: 503
        replica_state.proxy_url = None
        r = await replica.post("/write/again")
        assert r.status_code == 503
        # primary's proxy unreachable: 502 naming it
        replica_state.proxy_url = f"http://127.0.0.1:{free_port()}"
        r = await replica.post("/write/again")
        assert r.status_code == 502
        assert "cannot reach the primary's proxy" in r.text


async def test_forwarded_write_arriving_at_a_replica_is_not_forwarded_again(app: App) -> None:
    state = FakeState(primary=False)
    state.proxy_url = "http://127.0.0.1:1"
    async with running_proxy(proxy_config(app.port, forward=True), state) as client:
        r = await client.post("/write", headers={"litefspy-forwarded": "1"})
        assert r.status_code == 503
        assert "the primary is now primary-host; retry" in r.text
        # No primary at all (e.g. etcd unreachable): it says so, not "the primary changed".
        state.hostname = None
        r = await client.post("/write", headers={"litefspy-forwarded": "1"})
        assert r.status_code == 503
        assert "there is no primary (no node holds the lease right now); retry" in r.text
    assert app.hits == []


# ------------------------------------------------------- health and globs


async def test_health(app: App) -> None:
    state = FakeState(primary=False)
    config = replace(proxy_config(app.port), max_lag=2.0)
    async with running_proxy(config, state) as client:
        state.lag = 1.5
        r = await client.get("/litefs/health")
        assert (r.status_code, r.text) == (200, "OK\n")
        state.lag = 12.25
        r = await client.get("/litefs/health")
        assert r.status_code == 503
        assert "12.250s" in r.text and "max-lag 2s" in r.text
    assert app.hits == []


async def test_health_not_ready_comes_first(app: App) -> None:
    state = FakeState(primary=False)
    state.ready = (False, "catching up with the primary p1: receiving app.db 40%")
    async with running_proxy(proxy_config(app.port), state) as client:
        r = await client.get("/litefs/health")
        assert r.status_code == 503
        assert r.text == "not ready: catching up with the primary p1: receiving app.db 40%\n"
        state.ready = (True, "")
        r = await client.get("/litefs/health")
        assert (r.status_code, r.text) == (200, "OK\n")
    assert app.hits == []


async def test_passthrough_and_always_forward_globs(app: App) -> None:
    state = FakeState(primary=False, hostname="node-p")
    config = proxy_config(
        app.port, passthrough=("*.png", "/static/*"), always_forward=("/admin/*",)
    )
    async with running_proxy(config, state) as client:
        # passthrough: even a write on a replica goes to the local app, no cookie wait
        r = await client.post("/upload/logo.png", content=b"img")
        assert r.status_code == 201
        r = await client.get("/static/app.js", headers=cookie(99))
        assert r.status_code == 200  # no TXID wait for passthrough paths
        # always-forward: a GET is treated as a write
        r = await client.get("/admin/users")
        assert r.headers["fly-replay"] == "instance=node-p"
        r = await client.get("/public")
        assert "fly-replay" not in r.headers
    assert [h["path"] for h in app.hits] == ["/upload/logo.png", "/static/app.js", "/public"]

    state.primary = True
    state.set_txid(DB, 7)
    async with running_proxy(config, state) as client:
        r = await client.get("/admin/users")
        assert "__txid=0000000000000007" in r.headers["set-cookie"]
        r = await client.post("/static/form", content=b"x")
        assert "set-cookie" not in r.headers or "__txid" not in r.headers["set-cookie"]


# --------------------------------------------------------------- websocket


async def test_websocket_echo_through_the_proxy(state: FakeState) -> None:
    seen_paths: list[str] = []

    async def echo(request: Any) -> None:
        seen_paths.append(request.path)
        ws = await request.accept()
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            await ws.send_message(message)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, echo, "127.0.0.1", 0, None))
        config = proxy_config(server.port)
        async with trio.open_nursery() as proxy_nursery:
            port = await proxy_nursery.start(partial(serve_proxy, config, state))
            async with open_websocket_url(f"ws://127.0.0.1:{port}/chat?room=1") as ws:
                for i in range(20):
                    await ws.send_message(f"hello {i}")
                    assert await ws.get_message() == f"hello {i}"
                big = bytes(range(256)) * 1024
                await ws.send_message(big)
                assert await ws.get_message() == big
            proxy_nursery.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert seen_paths == ["/chat?room=1"]


# ------------------------------------------------------------------ errors


async def test_upstream_down_is_502(state: FakeState) -> None:
    async with running_proxy(proxy_config(free_port()), state) as client:
        r = await client.get("/")
        assert r.status_code == 502
        assert "proxy error: cannot reach the application" in r.text
        r = await client.post("/write", content=b"body")
        assert r.status_code == 502


async def raw_exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


async def test_garbage_request_is_400_and_the_proxy_keeps_serving(
    app: App, state: FakeState
) -> None:
    config = proxy_config(app.port)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_proxy, config, state))
        answer = await raw_exchange(port, b"THIS IS NOT HTTP\x00\x01\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"bad request" in answer
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        huge = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
        answer = await raw_exchange(port, huge)
        assert answer.startswith(b"HTTP/1.1 431 ")
        # the client disappearing mid-body does not hurt the server either
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /write HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nab")
        await stream.aclose()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/still-alive")
            assert r.json()["path"] == "/still-alive"
        nursery.cancel_scope.cancel()


async def test_http10_client(app: App, state: FakeState) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_proxy, proxy_config(app.port), state))
        answer = await raw_exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b'"path": "/old"' in answer
        nursery.cancel_scope.cancel()


async def test_bad_addresses() -> None:
    state = FakeState()
    with pytest.raises(ConfigError, match=r"invalid proxy\.addr"):
        await serve_proxy(ProxyConfig(addr="nonsense", target="127.0.0.1:1", db=DB), state)
    with pytest.raises(ConfigError, match=r"proxy\.db"):
        await serve_proxy(ProxyConfig(addr="127.0.0.1:0", target="127.0.0.1:1", db=""), state)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=rf"cannot listen on proxy\.addr 127\.0\.0\.1:{port}"):
            await serve_proxy(
                ProxyConfig(addr=f"127.0.0.1:{port}", target="127.0.0.1:1", db=DB), state
            )


async def test_txid_waiters_wake_on_notify_not_just_by_polling() -> None:
    txids = {DB: 0}
    # A recheck interval far beyond the test's deadline: only notify() can wake it.
    waiters = TxidWaiters(lambda db: txids.get(db, 0), recheck_interval=60)

    async def waiter(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await waiters.wait_for_txid(DB, 2)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(waiter)
            await trio.sleep(0.05)
            txids[DB] = 1
            waiters.notify()  # not enough yet: the waiter goes back to sleep
            await trio.sleep(0.05)
            txids[DB] = 2
            await trio.to_thread.run_sync(waiters.notify)  # from another thread
    assert waiters._waiting == 0

    with trio.move_on_after(0.1) as scope:
        await waiters.wait_for_txid(DB, 100)
    assert scope.cancelled_caught
    assert waiters._waiting == 0
