"""The HTTP proxy in front of the application (LiteFS-compatible behaviour).

* Reads (GET/HEAD) go to the local app; a request carrying `__txid=<16 hex>`
  first waits (up to `txid_timeout`, then 504) until the local copy of
  `proxy.db` reaches that TXID, so a client reads its own writes.
* Writes (any other method, or a path matching `proxy.always-forward`): on the
  primary they go to the app and the response gets `Set-Cookie: __txid=<TXID
  after the response>`; on a replica they are answered `200` with
  `fly-replay: instance=<primary hostname>` (the platform's edge replays them on
  the primary), or with `proxy.forward: true` relayed to the primary's proxy.
* `GET /litefs/health`: 503 `not ready: <why>` until the node is ready (a
  primary with the lease, or a replica that caught up with a primary once);
  then 200 `OK` while the replication lag is within `proxy.max-lag`, 503
  naming the lag otherwise.
* `proxy.passthrough` paths go to the app untouched (no wait, no cookie).
* Protocol upgrades (WebSocket) are passed to the app; after its 101 the proxy
  pumps bytes both ways.

Library choice: h11 (the HTTP/1.1 state machine under httpx and hypercorn) on
trio sockets for the server side, because the proxy needs request-level control
that an ASGI server hides or complicates: answering before reading a body,
streaming bodies both ways without buffering, and handing over the raw socket
after a 101. Upstream requests use httpx's trio-capable transport directly
(not `AsyncClient`): a proxy must not keep a cookie jar shared between users,
add default headers, follow redirects or honour `HTTP_PROXY` for a local app;
httpcore under it also exposes the upgraded connection for WebSockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import h11
import httpcore
import httpx
import trio

from litefspy.config import ProxyConfig
from litefspy.errors import ConfigError
from litefspy.http.connection import RECEIVE_SIZE, ClientGone, HTTPConnection
from litefspy.http.server import serve_http
from litefspy.http.target import origin_form, request_path
from litefspy.logs import kv
from litefspy.proxy.routing import (
    FORWARDED_HEADER,
    Route,
    classify,
    has_header,
    is_upgrade,
    strip_hop_by_hop,
    txid_from_cookies,
    txid_set_cookie,
    upstream_request_headers,
)

log = logging.getLogger(__name__)

# How long a read waits for the local database to reach the client's TXID.
DEFAULT_TXID_TIMEOUT = 5.0
# Lifetime of the __txid cookie in seconds.
TXID_COOKIE_MAX_AGE = 5
# Upstream timeouts; no read timeout: apps may stream or long-poll.
UPSTREAM_TIMEOUTS = {"connect": 10.0, "read": None, "write": 60.0, "pool": 10.0}
# An upgrade request's body (rare) is read whole before it goes upstream.
UPGRADE_BODY_LIMIT = 1 << 20


class ProxyState(Protocol):
    """What the proxy needs to know about the node (implemented by cluster/adapters.py)."""

    def is_primary(self) -> bool:
        """This node holds the primary lease and accepts writes."""
        ...

    def primary_hostname(self) -> str | None:
        """The primary's `lease.hostname` (for fly-replay), None if unknown."""
        ...

    def primary_proxy_url(self) -> str | None:
        """Base URL of the primary's proxy, e.g. `http://host:8080` (proxy.forward)."""
        ...

    def no_primary_reason(self) -> str:
        """Why no primary is known right now, e.g. `lease unreachable: ...` (for 503s)."""
        ...

    def txid(self, db: str) -> int:
        """The local TXID of database `db`, 0 if absent."""
        ...

    async def wait_for_txid(self, db: str, txid: int) -> None:
        """Return once the local TXID of `db` is >= `txid` (cancellable)."""
        ...

    def lag_seconds(self) -> float:
        """Seconds since the last data or heartbeat from the primary (0 on the primary)."""
        ...

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): the node holds the lease, or caught up with a primary once."""
        ...


# `observe(route, outcome, seconds)`: one finished request (metrics).
RequestObserver = Callable[[str, str, float], None]


class _Aborted(Exception):
    """The response was already under way when the upstream failed: drop the connection."""


def target_url(target: str) -> httpx.URL:
    """`proxy.target` (`host:port`, `:port` or a URL) as an http base URL."""
    text = target.strip()
    if not text:
        raise ConfigError("proxy.target is empty: set it to the app's HOST:PORT")
    if "://" not in text:
        text = f"http://localhost{text}" if text.startswith(":") else f"http://{text}"
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ConfigError(f'invalid proxy.target "{target}": {exc}') from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f'invalid proxy.target "{target}": expected HOST:PORT')
    return url


class Proxy:
    """Routes each request (see the module docstring); one instance per listener."""

    def __init__(
        self,
        config: ProxyConfig,
        state: ProxyState,
        transport: httpx.AsyncBaseTransport,
        *,
        txid_timeout: float = DEFAULT_TXID_TIMEOUT,
        cookie_max_age: int = TXID_COOKIE_MAX_AGE,
        observe: RequestObserver | None = None,
    ) -> None:
        if not config.db.strip():
            raise ConfigError("proxy.db is empty: name the database whose TXID the proxy tracks")
        self.config = config
        self.state = state
        self.transport = transport
        self.target = target_url(config.target)
        self.txid_timeout = txid_timeout
        self.cookie_max_age = cookie_max_age
        self.observe = observe

    # ---------------------------------------------------------- connection

    async def handle_connection(self, conn: HTTPConnection) -> None:
        """Serve requests on one client connection until it closes."""
        while True:
            request = await conn.next_request()
            if request is None:
                return
            started = time.perf_counter()
            route = "unknown"
            outcome = "dropped"
            try:
                route = await self.handle_request(conn, request)
                outcome = _outcome(conn)
            except (ClientGone, _Aborted) as exc:
                log.debug("proxy connection dropped %s", kv(client=conn.client_ip, reason=exc))
                return
            except Exception:
                log.exception(
                    "proxy request failed %s",
                    kv(method=request.method.decode(), target=request.target.decode("latin-1")),
                )
                if conn.can_respond():
                    await conn.respond(
                        500, b"proxy error: internal error (see the node's log)\n", close=True
                    )
                outcome = "error"
                return
            finally:
                if self.observe is not None:
                    self.observe(route, outcome, time.perf_counter() - started)
            if not await conn.finish_cycle():
                return

    async def handle_request(self, conn: HTTPConnection, request: h11.Request) -> str:
        """Serve one request; the route it took (metrics label)."""
        path = request_path(request.target)
        route = classify(
            request.method,
            path,
            passthrough=self.config.passthrough,
            always_forward=self.config.always_forward,
        )
        log.debug(
            "proxy %s",
            kv(method=request.method.decode(), path=path, route=route.value),
        )
        if route is Route.PASSTHROUGH:
            await self.relay(conn, self.target, where="the application")
        elif route is Route.HEALTH:
            await self.health(conn)
        elif route is Route.READ:
            await self.read(conn, request)
        else:
            await self.write(conn, request)
        return str(route.value)

    # -------------------------------------------------------------- routes

    async def health(self, conn: HTTPConnection) -> None:
        ready, why = self.state.readiness()
        if not ready:
            await conn.respond(503, f"not ready: {why}\n".encode())
            return
        lag = self.state.lag_seconds()
        max_lag = self.config.max_lag
        if lag > max_lag:
            body = (f"replication lag {lag:.3f}s exceeds proxy.max-lag {max_lag:g}s\n").encode()
            await conn.respond(503, body)
        else:
            await conn.respond(200, b"OK\n")

    async def read(self, conn: HTTPConnection, request: h11.Request) -> None:
        want = txid_from_cookies(request.headers)
        db = self.config.db
        if want and self.state.txid(db) < want:
            with trio.move_on_after(self.txid_timeout):
                await self.state.wait_for_txid(db, want)
            have = self.state.txid(db)
            if have < want:
                log.info(
                    "proxy read timed out waiting for txid %s",
                    kv(db=db, txid=f"{have:016x}", want=f"{want:016x}"),
                )
                body = (
                    f"proxy timeout: database {db} on this node is at TXID {have:016x}, "
                    f"this client has seen TXID {want:016x}; replication did not catch up "
                    f"within {self.txid_timeout:g}s, retry later\n"
                ).encode()
                await conn.respond(504, body)
                return
        await self.relay(conn, self.target, where="the application")

    async def write(self, conn: HTTPConnection, request: h11.Request) -> None:
        if self.state.is_primary():
            await self.relay(conn, self.target, where="the application", cookie=True)
            return
        host = self.state.primary_hostname()
        if has_header(request.headers, FORWARDED_HEADER):
            # Forwarded by a replica that still took this node for the primary.
            if host is None:
                now = f"there is no primary ({self.state.no_primary_reason()})"
            else:
                now = f"the primary is now {host}"
            body = f"proxy error: this write was forwarded here as to the primary, but {now}"
            await conn.respond(503, f"{body}; retry\n".encode())
            return
        if host is None:
            body = f"proxy error: no primary ({self.state.no_primary_reason()}); retry\n"
            await conn.respond(503, body.encode())
            return
        if self.config.forward:
            url = self.state.primary_proxy_url()
            if url is None:
                body = f"proxy error: no primary ({self.state.no_primary_reason()}); retry\n"
                await conn.respond(503, body.encode())
                return
            conn.outcome = "forwarded"
            await self.relay(conn, httpx.URL(url), where="the primary's proxy", forwarded=True)
            return
        conn.outcome = "replay"
        await conn.respond(200, headers=[(b"fly-replay", f"instance={host}".encode())])

    # ------------------------------------------------------------ relaying

    async def relay(
        self,
        conn: HTTPConnection,
        base: httpx.URL,
        *,
        where: str,
        cookie: bool = False,
        forwarded: bool = False,
    ) -> None:
        """Send the current request to `base` and stream the answer back."""
        request = conn.request
        assert request is not None
        upgrade = is_upgrade(request.headers)
        headers = upstream_request_headers(
            request.headers, client_ip=conn.client_ip, upgrade=upgrade, forwarded=forwarded
        )
        content: Any = None
        if upgrade:
            # h11 only switches protocols once the request is complete.
            body = await _read_all(conn, UPGRADE_BODY_LIMIT)
            content = body if conn.has_body() else None
        elif conn.has_body():
            content = conn.body()
        upstream_request = httpx.Request(
            request.method.decode("ascii"),
            base.copy_with(raw_path=origin_form(request.target)),
            headers=headers,
            content=content,
            extensions={"timeout": UPSTREAM_TIMEOUTS},
        )
        try:
            response = await self.transport.handle_async_request(upstream_request)
        except httpx.TransportError as exc:
            await self._bad_gateway(conn, base, where, exc)
            return
        try:
            if response.status_code == 101:
                if not upgrade:
                    await self._bad_gateway(conn, base, where, "unexpected 101 response")
                    return
                await self._tunnel(conn, response)
                return
            out = strip_hop_by_hop(response.headers.raw)
            if cookie:
                txid = self.state.txid(self.config.db)
                if txid:
                    out.append(txid_set_cookie(txid, self.cookie_max_age))
            reason = response.extensions.get("reason_phrase", b"")
            await conn.start_response(response.status_code, out, reason=reason)
            try:
                async for chunk in response.aiter_raw():
                    await conn.send_data(chunk)
            except httpx.TransportError as exc:
                raise _Aborted(f"{where} failed mid-response: {exc}") from None
            await conn.end_response()
        finally:
            await response.aclose()

    async def _bad_gateway(
        self, conn: HTTPConnection, base: httpx.URL, where: str, exc: object
    ) -> None:
        reason = str(exc) or type(exc).__name__
        log.warning("proxy upstream failed %s", kv(upstream=str(base), error=reason))
        if not conn.can_respond():
            raise _Aborted(f"{where} failed: {reason}")
        body = f"proxy error: cannot reach {where} at {base}: {reason}\n".encode()
        await conn.respond(502, body, close=conn.h11.their_state is h11.SEND_BODY)

    async def _tunnel(self, conn: HTTPConnection, response: httpx.Response) -> None:
        """After the app's 101: answer 101 and pump raw bytes both ways until one side ends."""
        headers = strip_hop_by_hop(response.headers.raw, upgrade=True)
        reason = response.extensions.get("reason_phrase", b"")
        await conn.send(h11.InformationalResponse(status_code=101, headers=headers, reason=reason))
        upstream = response.extensions["network_stream"]
        pending, _ = conn.h11.trailing_data
        await _pump(conn.stream, upstream, pending)


def _outcome(conn: HTTPConnection) -> str:
    """How a request ended, for metrics: ok, replay, forwarded, client-error, error."""
    status = conn.status
    if status >= 500:
        return "error"
    if conn.outcome is not None:
        return conn.outcome
    if status >= 400:
        return "client-error"
    return "ok" if status else "dropped"


async def _read_all(conn: HTTPConnection, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while (chunk := await conn.receive_body_chunk()) is not None:
        size += len(chunk)
        if size > limit:
            raise ClientGone("upgrade request body too large")
        parts.append(chunk)
    return b"".join(parts)


_PUMP_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, httpcore.NetworkError, OSError)


async def _pump(client: trio.SocketStream, upstream: Any, pending: bytes) -> None:
    """Copy bytes client<->upstream (httpcore network stream) until either side closes."""
    async with trio.open_nursery() as nursery:

        async def client_to_upstream() -> None:
            try:
                if pending:
                    await upstream.write(pending)
                while data := await client.receive_some(RECEIVE_SIZE):
                    await upstream.write(data)
            except _PUMP_ERRORS:
                pass
            nursery.cancel_scope.cancel()

        async def upstream_to_client() -> None:
            try:
                while data := await upstream.read(RECEIVE_SIZE):
                    await client.send_all(data)
            except _PUMP_ERRORS:
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(client_to_upstream)
        nursery.start_soon(upstream_to_client)


async def serve_proxy(
    config: ProxyConfig,
    state: ProxyState,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    txid_timeout: float = DEFAULT_TXID_TIMEOUT,
    cookie_max_age: int = TXID_COOKIE_MAX_AGE,
    transport: httpx.AsyncBaseTransport | None = None,
    observe: RequestObserver | None = None,
) -> None:
    """Serve the proxy on `config.addr` until cancelled.

    `task_status.started()` receives the bound port once it listens. Raises
    ConfigError for a bad addr/target/db and ListenError when the address
    cannot be bound.
    """
    own = transport is None
    upstream = transport or httpx.AsyncHTTPTransport(
        # No pool cap: WebSocket tunnels hold their upstream connection for long.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
    )
    try:
        proxy = Proxy(
            config,
            state,
            upstream,
            txid_timeout=txid_timeout,
            cookie_max_age=cookie_max_age,
            observe=observe,
        )
        log.debug(
            "proxy config %s",
            kv(addr=config.addr, target=config.target, db=config.db, forward=config.forward),
        )
        await serve_http(
            config.addr, "proxy.addr", proxy.handle_connection, task_status=task_status
        )
    finally:
        if own:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
