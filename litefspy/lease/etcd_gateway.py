"""A small client for etcd's v3 JSON gateway (`POST /v3/...` on the client URL).

Only what the lease needs: unary calls (`kv/range`, `kv/txn`, `lease/grant`,
`lease/revoke`, `lease/keepalive`) and the streaming `watch`. It speaks the
documented gRPC-gateway JSON, never etcd's .proto files, over
`httpx.AsyncClient` (trio-native).

Failover and errors:

* endpoints are tried in order starting from the last one that answered;
  an error where the request cannot have reached etcd (connection refused,
  connect timeout) moves on to the next endpoint. Other transport errors
  (read timeout, connection reset) leave it unknown whether etcd applied the
  request, so they move on only for requests marked idempotent;
* every request is bounded by `request_timeout` (httpx's per-operation
  timeouts plus a trio deadline on the whole exchange, so a server that
  accepts the connection but never answers, e.g. a SIGSTOPped etcd, cannot
  hang the caller);
* failures surface as `EtcdUnreachableError` (transport) or `EtcdRequestError`
  (etcd answered with an error), both `LeaseError` subclasses with a one-line
  message naming the endpoint. httpx exceptions never escape.

Caveats of etcd 3.4's gateway that the code relies on (seen on 3.4.23):

* int64 fields (revisions, lease ids, TTLs) are JSON strings, and fields at
  their zero value are omitted: a failed txn has no `succeeded`, a keepalive
  of an expired lease answers 200 with no `TTL`;
* streaming RPCs (`lease/keepalive`, `watch`) wrap each message in
  `{"result": ...}`, one JSON object per line; keepalive answers once and
  closes because the request body ends after one message;
* errors come back as an HTTP status mapped from the gRPC code, with a body
  `{"error", "message", "code"}` (e.g. 404 / code 5 for an unknown lease).
"""

from __future__ import annotations

import base64
import errno
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from litefspy.errors import LeaseError
from litefspy.logs import kv

log = logging.getLogger(__name__)
# httpx logs every request at INFO (httpcore every step at DEBUG): with renewals
# every ttl/3 that drowns the node's own log. Failures reach the log through the
# LeaseErrors raised here.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.INFO)

# gRPC status codes etcd reports in error bodies (google.golang.org/grpc/codes).
GRPC_NOT_FOUND = 5


class EtcdUnreachableError(LeaseError):
    """No endpoint answered (connection refused, timed out, reset).

    `maybe_applied` is False only when no endpoint can have received the
    request (every connect failed), so a mutation certainly did not happen.
    """

    def __init__(self, message: str, *, maybe_applied: bool) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class EtcdRequestError(LeaseError):
    """etcd answered, but with an error (`code` is the gRPC status code)."""

    def __init__(self, message: str, *, code: int | None, endpoint: str) -> None:
        super().__init__(message)
        self.code = code
        self.endpoint = endpoint


def b64(text: str | bytes) -> str:
    """Encode a key or value the way the gateway wants bytes fields."""
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(field: str | None) -> bytes:
    """Decode a bytes field from a gateway answer (absent means empty)."""
    return base64.b64decode(field) if field else b""


def as_int(obj: dict[str, Any], name: str) -> int:
    """Read an int64 field: a JSON string, or absent when zero."""
    value = obj.get(name)
    return int(value) if value is not None else 0


def describe_transport_error(exc: BaseException, timeout: float) -> str:
    """A short, lower-case reason for a transport failure ("connection refused")."""
    if isinstance(exc, httpx.TimeoutException | trio.TooSlowError):
        return f"no answer within {timeout:g}s"
    # The errno sits deep down: httpx wraps httpcore's error, which wraps trio's
    # "all attempts to connect failed", which groups one OSError per address.
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            if cur.errno == errno.ECONNREFUSED:
                return "connection refused"
            return (cur.strerror or str(cur)).lower()
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def decode_answer(endpoint: str, path: str, status: int, content: bytes) -> dict[str, Any]:
    """Decode a gateway answer, unwrapping `result`; raise EtcdRequestError on errors."""
    try:
        obj = json.loads(content)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        first = content.decode(errors="replace").strip().splitlines()[:1]
        raise EtcdRequestError(
            f"etcd at {endpoint} answered HTTP {status} to /v3/{path} with "
            f"{first[0] if first else 'an empty body'!r} (is it etcd >= 3.4?)",
            code=None,
            endpoint=endpoint,
        )
    # Streaming RPCs report failures in-band as {"error": {...}} with status 200.
    err = obj.get("error")
    if status != httpx.codes.OK or err is not None:
        if isinstance(err, dict):
            message, code = err.get("message"), err.get("grpc_code", err.get("code"))
        else:
            message, code = obj.get("message", err), obj.get("code")
        raise EtcdRequestError(
            f"etcd at {endpoint} refused /v3/{path}: {message or f'HTTP {status}'}",
            code=int(code) if isinstance(code, int | str) and str(code).isdigit() else None,
            endpoint=endpoint,
        )
    result = obj.get("result")
    return result if isinstance(result, dict) else obj


class EtcdGateway:
    """JSON-gateway calls against a list of etcd client URLs, with failover."""

    def __init__(self, endpoints: Sequence[str], *, request_timeout: float) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint (lease.etcd.endpoints)")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {request_timeout!r}")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.request_timeout = request_timeout
        self._preferred = 0
        # trust_env=False: etcd is cluster-internal; an HTTP(S)_PROXY meant for the
        # app must not silently route lease traffic (and its timeouts) elsewhere.
        self._client = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(request_timeout))

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._preferred + i) % n] for i in range(n)]

    def _prefer(self, endpoint: str) -> None:
        self._preferred = self.endpoints.index(endpoint)

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        idempotent: bool,
        time_limit: float | None = None,
    ) -> dict[str, Any]:
        """POST `body` to `/v3/<path>` and return the decoded answer.

        Streaming RPCs answered once (keepalive) are unwrapped from `result`.
        `time_limit` (default `request_timeout`) bounds each endpoint's attempt;
        it is a parameter rather than the caller's cancel scope because it also
        sets httpx's socket timeouts and a timeout must become a LeaseError
        naming the endpoint, not a bare trio.TooSlowError.
        """
        limit = self.request_timeout if time_limit is None else time_limit
        failures: list[str] = []
        maybe_applied = False
        for endpoint in self._order():
            url = f"{endpoint}/v3/{path}"
            try:
                with trio.fail_after(limit):
                    resp = await self._client.post(url, json=body, timeout=limit)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                # Never reached etcd: safe to try the next endpoint.
                failures.append(self._unreachable(endpoint, e, limit))
                continue
            except (httpx.TransportError, trio.TooSlowError) as e:
                failures.append(self._unreachable(endpoint, e, limit))
                maybe_applied = True
                if idempotent:
                    continue
                raise EtcdUnreachableError("; ".join(failures), maybe_applied=True) from None
            self._prefer(endpoint)
            return decode_answer(endpoint, path, resp.status_code, resp.content)
        raise EtcdUnreachableError("; ".join(failures), maybe_applied=maybe_applied)

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[GatewayStream]:
        """Open a streaming RPC and yield it; closed when the block exits.

        Opening (connect and response headers) is bounded by `request_timeout`
        and fails over like `call`; `GatewayStream.receive` is not bounded, so
        the caller puts its own deadline on waiting for the next message.
        """
        failures: list[str] = []
        limit = self.request_timeout
        for endpoint in self._order():
            url = f"{endpoint}/v3/{path}"
            timeout = httpx.Timeout(limit, read=None)
            request = self._client.build_request("POST", url, json=body, timeout=timeout)
            try:
                with trio.fail_after(limit):
                    resp = await self._client.send(request, stream=True)
            except (httpx.TransportError, trio.TooSlowError) as e:
                failures.append(self._unreachable(endpoint, e, limit))
                continue
            opened = GatewayStream(endpoint, path, resp, self.request_timeout)
            try:
                if resp.status_code != httpx.codes.OK:
                    decode_answer(endpoint, path, resp.status_code, await resp.aread())
                self._prefer(endpoint)
                yield opened
            finally:
                await opened.aclose()
            return
        # Opening a stream changes nothing in etcd, so whether it "applied" is moot.
        raise EtcdUnreachableError("; ".join(failures), maybe_applied=False)

    def _unreachable(self, endpoint: str, exc: BaseException, timeout: float) -> str:
        reason = describe_transport_error(exc, timeout)
        log.debug("etcd request failed %s", kv(endpoint=endpoint, reason=reason))
        return f"etcd at {endpoint} unreachable: {reason}"


class GatewayStream:
    """One open streaming RPC: `receive()` returns its messages one by one."""

    def __init__(
        self, endpoint: str, path: str, resp: httpx.Response, request_timeout: float
    ) -> None:
        self.endpoint = endpoint
        self._path = path
        self._resp = resp
        self._request_timeout = request_timeout
        self._lines = resp.aiter_lines()

    async def aclose(self) -> None:
        """Close the connection and finish httpx's chain of body iterators.

        httpx reads a body through several nested async generators; closing the
        outer one leaves the inner ones suspended, and trio warns when the
        garbage collector finds them. Closing the socket first and then reading
        until the read fails unwinds every one of them deterministically.
        """
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self._resp.aclose()
            for _ in range(10_000):  # only buffered lines can still come out
                try:
                    await anext(self._lines)
                except (StopAsyncIteration, httpx.HTTPError, httpx.StreamError):
                    return

    async def receive(self) -> dict[str, Any]:
        """The next message (unwrapped from `result`); raises LeaseError at the end."""
        while True:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                raise EtcdUnreachableError(
                    f"etcd at {self.endpoint} closed the /v3/{self._path} stream",
                    maybe_applied=False,
                ) from None
            except httpx.TransportError as e:
                reason = describe_transport_error(e, self._request_timeout)
                raise EtcdUnreachableError(
                    f"etcd at {self.endpoint} unreachable: {reason}", maybe_applied=False
                ) from None
            if line.strip():
                return decode_answer(self.endpoint, self._path, httpx.codes.OK, line.encode())
