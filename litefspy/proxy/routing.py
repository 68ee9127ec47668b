"""Pure request classification and header rewriting for the proxy (no I/O).

Names follow LiteFS's proxy: the `__txid` cookie carries the primary's TXID
after a client's write, `/litefs/health` reports replication lag, a replica
answers writes with `fly-replay: instance=<primary hostname>`.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Sequence

TXID_COOKIE = "__txid"
HEALTH_PATH = "/litefs/health"
# Added to a write forwarded to the primary's proxy, so a node that is no longer
# primary answers 503 instead of forwarding it again (no loops during failover).
FORWARDED_HEADER = b"litefspy-forwarded"
READ_METHODS = frozenset({b"GET", b"HEAD"})

# RFC 9110 section 7.6.1: meaningful for one connection only, never relayed.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

Headers = list[tuple[bytes, bytes]]


class Route(enum.Enum):
    """What the proxy does with a request."""

    PASSTHROUGH = "passthrough"  # to the local app untouched: no wait, no cookie
    HEALTH = "health"  # answered by the proxy
    READ = "read"  # wait for the client's TXID, then the local app
    WRITE = "write"  # primary: local app + cookie; replica: fly-replay or forward


def matches_any(path: str, globs: Sequence[str]) -> bool:
    """fnmatch-style, case-sensitive; `*` also matches `/` (e.g. `*.png`)."""
    return any(fnmatch.fnmatchcase(path, glob) for glob in globs)


def classify(
    method: bytes,
    path: str,
    *,
    passthrough: Sequence[str] = (),
    always_forward: Sequence[str] = (),
) -> Route:
    """Route a request by method and path (passthrough wins over everything)."""
    if matches_any(path, passthrough):
        return Route.PASSTHROUGH
    if method in READ_METHODS and path == HEALTH_PATH:
        return Route.HEALTH
    if method in READ_METHODS and not matches_any(path, always_forward):
        return Route.READ
    return Route.WRITE


def parse_txid(text: str) -> int | None:
    """A TXID as LiteFS writes it: exactly 16 hex digits; None otherwise."""
    if len(text) != 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def txid_from_cookies(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The `__txid` cookie's TXID from the request's Cookie headers (None if absent/bad)."""
    found: int | None = None
    for name, value in headers:
        if name.lower() != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep and key == TXID_COOKIE:
                found = parse_txid(val.strip().strip('"'))
    return found


def txid_set_cookie(txid: int, max_age: int) -> tuple[bytes, bytes]:
    """The Set-Cookie header that tags a client with the TXID of its write."""
    value = f"{TXID_COOKIE}={txid:016x}; Path=/; Max-Age={max_age}; HttpOnly"
    return (b"set-cookie", value.encode())


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Comma-separated values of `name` across all its headers, lowercased and stripped."""
    out: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            out.extend(v.strip().lower() for v in value.split(b",") if v.strip())
    return out


def is_upgrade(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The request asks to switch protocols (e.g. WebSocket): `Connection: upgrade`."""
    headers = list(headers)
    return b"upgrade" in header_values(headers, b"connection") and bool(
        header_values(headers, b"upgrade")
    )


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]], *, upgrade: bool = False) -> Headers:
    """Drop hop-by-hop headers (and those named in Connection).

    With `upgrade`, keep `Connection: upgrade` and `Upgrade` so a protocol switch
    (WebSocket) can be negotiated end to end.
    """
    headers = list(headers)
    named = set(header_values(headers, b"connection"))
    out: Headers = []
    for key, value in headers:
        lower = key.lower()
        if upgrade and lower == b"upgrade":
            out.append((lower, value))
        elif lower in HOP_BY_HOP or lower in named:
            continue
        else:
            out.append((lower, value))
    if upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str,
    upgrade: bool = False,
    forwarded: bool = False,
) -> Headers:
    """Request headers for the app or the primary's proxy.

    Hop-by-hop headers and `Expect` go (this proxy answers 100-continue itself);
    Host stays; the client address is appended to X-Forwarded-For.
    """
    out: Headers = []
    xff: list[bytes] = []
    for key, value in strip_hop_by_hop(headers, upgrade=upgrade):
        if key in (b"expect", FORWARDED_HEADER):
            continue
        if key == b"x-forwarded-for":
            xff.append(value.strip())
            continue
        out.append((key, value))
    if client_ip:
        xff.append(client_ip.encode())
    if xff:
        out.append((b"x-forwarded-for", b", ".join(xff)))
    if forwarded:
        out.append((FORWARDED_HEADER, b"1"))
    return out


def has_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(key.lower() == name for key, _ in headers)
