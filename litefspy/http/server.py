"""The HTTP/1.1 server the proxy and the metrics endpoint share: listen, then
run a handler per connection (`litefspy.http.connection` speaks the protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from litefspy.errors import ConfigError, LitefspyError
from litefspy.http.connection import HTTPConnection
from litefspy.logs import kv

log = logging.getLogger(__name__)


class ListenError(LitefspyError):
    """A server could not bind its configured address."""


def parse_listen_address(addr: str, key: str) -> tuple[str | None, int]:
    """`host:port`, `:port` or `[v6]:port` -> (host or None for all interfaces, port).

    Port 0 (any free port) is accepted so tests can bind ephemeral ports.
    """
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f'invalid {key} "{addr}": expected HOST:PORT or :PORT, e.g. ":8080"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port_text)


async def open_listeners(addr: str, key: str) -> list[trio.SocketListener]:
    """Bind `addr`; a ConfigError/ListenError names the config key on failure."""
    host, port = parse_listen_address(addr, key)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {key} {addr}: {reason}") from None


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The port the first listener is bound to (useful with port 0)."""
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def serve_http(
    addr: str,
    key: str,
    handler: Callable[[HTTPConnection], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `addr` and run `handler` for every connection until cancelled.

    `task_status.started()` receives the bound port once the socket listens. A
    handler's unexpected exception is logged and closes only its connection.
    """
    listeners = await open_listeners(addr, key)
    port = bound_port(listeners)

    async def on_connection(stream: trio.SocketStream) -> None:
        conn = HTTPConnection(stream)
        try:
            await handler(conn)
        except Exception:
            log.exception("http connection failed %s", kv(listen=key, client=conn.client_ip))
        finally:
            await conn.aclose()

    log.info("listening %s", kv(key=key, addr=addr, port=port))
    task_status.started(port)
    await trio.serve_listeners(on_connection, listeners)
