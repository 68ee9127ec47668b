"""One HTTP/1.1 client connection on a trio stream, driven by h11's state machine.

h11 does all the HTTP parsing and framing (request line, headers, chunked and
Content-Length bodies, keep-alive, 100-continue, protocol upgrades); this module
only moves bytes between it and a trio stream, bounds how long a client may
take, and turns protocol errors into a clean 4xx and a closed connection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import cast

import h11
import trio

from litefspy.logs import kv

log = logging.getLogger(__name__)

# A client has this long to send a request's head (also the keep-alive idle time).
REQUEST_HEAD_TIMEOUT = 60.0
# Longest wait for the next piece of a request body.
BODY_READ_TIMEOUT = 60.0
# After answering without reading the request body, read and drop at most this
# much of it (for this long) so the connection can be reused; beyond, close it.
DRAIN_LIMIT = 1 << 20
DRAIN_TIMEOUT = 2.0
# On close, how long to keep reading (and dropping) what the client still sends.
LINGER_TIMEOUT = 1.0
RECEIVE_SIZE = 65536
MAX_HEAD_SIZE = 64 * 1024

Headers = list[tuple[bytes, bytes]]


class ClientGone(Exception):
    """The client closed, reset, stalled or broke the protocol mid-request."""


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ""
    if isinstance(peer, tuple):
        return str(peer[0])
    return str(peer)


class HTTPConnection:
    """One client connection: an h11 server state machine over a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.client_ip = _peer_ip(stream)
        self.request: h11.Request | None = None
        # Status code of the response to the current request (0: none sent yet),
        # and what the proxy made of it when the status alone does not say (metrics).
        self.status = 0
        self.outcome: str | None = None
        # The client sent `Expect: 100-continue` and we have not said 100 yet.
        self._expecting_continue = False
        self._closed = False

    # ----------------------------------------------------------- receiving

    async def _receive(self) -> None:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.h11.receive_data(data)

    async def _next_event(self) -> h11.Event | None:
        """The next event from the client; None when h11 pauses (protocol switch pending)."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                await self._receive()
            elif event is h11.PAUSED:
                return None
            else:
                return cast(h11.Event, event)

    async def next_request(self) -> h11.Request | None:
        """The next request's head, or None when the client is done or sent garbage.

        A malformed request is answered here (400, or 431 for an oversized head)
        and the connection is then unusable.
        """
        self.request = None
        self.status = 0
        self.outcome = None
        event: h11.Event | None = None
        try:
            # Idle or too slow (no head within the timeout): just close.
            with trio.move_on_after(REQUEST_HEAD_TIMEOUT):
                event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            log.info("bad request %s", kv(client=self.client_ip, error=exc))
            if self.can_respond():
                await self.respond(
                    exc.error_status_hint,
                    f"bad request: {exc}\n".encode(),
                    close=True,
                )
            return None
        if not isinstance(event, h11.Request):
            return None
        self.request = event
        self._expecting_continue = self.h11.they_are_waiting_for_100_continue
        return event

    def has_body(self) -> bool:
        """The current request announced a body (Content-Length > 0 or chunked)."""
        assert self.request is not None
        for name, value in self.request.headers:
            if name == b"transfer-encoding":
                return True
            if name == b"content-length":
                return value.strip() not in (b"0", b"")
        return False

    def body(self) -> RequestBody:
        """The current request's body as an async iterator of byte chunks."""
        return RequestBody(self)

    async def receive_body_chunk(self) -> bytes | None:
        """The next piece of the request body; None at its end. Raises ClientGone."""
        if self.h11.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        self._expecting_continue = False
        try:
            with trio.fail_after(BODY_READ_TIMEOUT):
                event = await self._next_event()
        except trio.TooSlowError:
            raise ClientGone("timed out reading the request body") from None
        except h11.RemoteProtocolError as exc:
            raise ClientGone(f"malformed request body: {exc}") from None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise ClientGone("connection closed in the middle of the request body")

    # ------------------------------------------------------------- sending

    def can_respond(self) -> bool:
        """No response (status line) has been sent for the current request yet."""
        return self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    async def send(self, event: h11.Event) -> None:
        """Send one h11 event; ClientGone if the client went away."""
        data = self.h11.send(event)
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(f"client went away: {exc}") from None

    async def start_response(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], reason: bytes = b""
    ) -> None:
        self.status = status
        await self.send(h11.Response(status_code=status, headers=list(headers), reason=reason))

    async def send_data(self, data: bytes) -> None:
        if data:
            await self.send(h11.Data(data=data))

    async def end_response(self) -> None:
        await self.send(h11.EndOfMessage())

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes = b"text/plain; charset=utf-8",
        close: bool = False,
    ) -> None:
        """Send a complete, small response (no body is sent for HEAD)."""
        out: Headers = list(headers)
        if body:
            out.append((b"content-type", content_type))
        out.append((b"content-length", str(len(body)).encode()))
        if close:
            out.append((b"connection", b"close"))
        await self.start_response(status, out)
        if self.request is None or self.request.method != b"HEAD":
            await self.send_data(body)
        await self.end_response()

    # ----------------------------------------------------------- lifecycle

    async def finish_cycle(self) -> bool:
        """After a response: True when the connection is ready for the next request."""
        if self.h11.our_state is not h11.DONE:
            return False
        if self.h11.their_state is h11.SEND_BODY and not await self._drain():
            return False
        if self.h11.their_state is not h11.DONE or self.h11.our_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        return True

    async def _drain(self) -> bool:
        """Read and drop an unread request body (bounded); False if it did not end."""
        if self._expecting_continue:
            return False  # they will not send it: we never said 100 Continue
        dropped = 0
        with trio.move_on_after(DRAIN_TIMEOUT):
            while dropped <= DRAIN_LIMIT:
                try:
                    chunk = await self.receive_body_chunk()
                except ClientGone:
                    return False
                if chunk is None:
                    return True
                dropped += len(chunk)
        return False

    async def aclose(self) -> None:
        """Close gracefully: stop sending, then drop what the client still sends (briefly).

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the response we just wrote before the client reads it (e.g. a 431 for
        an oversized head, or an answer given without reading a large body).
        """
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(LINGER_TIMEOUT):
                await self._linger()
        finally:
            # trio closes the socket even when this checkpoint is cancelled.
            await self.stream.aclose()

    async def _linger(self) -> None:
        try:
            await self.stream.send_eof()
            dropped = 0
            while dropped < DRAIN_LIMIT:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class RequestBody:
    """Async iterator over the current request's body (an object, not a generator,
    so an upstream that stops reading early leaves nothing to finalize)."""

    def __init__(self, conn: HTTPConnection) -> None:
        self._conn = conn
        self._done = False

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            chunk = await self._conn.receive_body_chunk()
            if chunk is None:
                self._done = True
            elif chunk:
                return chunk
        raise StopAsyncIteration
