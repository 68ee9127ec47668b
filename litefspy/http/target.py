"""Request targets: what the path of an HTTP request is (pure, no I/O)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit


def origin_form(target: bytes) -> bytes:
    """The request target as `/path?query` (absolute-form targets are reduced)."""
    if target.startswith(b"/"):
        return target
    if target == b"*":
        return target
    parts = urlsplit(target.decode("latin-1"))
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return (path + query).encode("latin-1")


def request_path(target: bytes) -> str:
    """The percent-decoded path of a request target, without the query."""
    path = origin_form(target).split(b"?", 1)[0]
    return unquote(path.decode("latin-1"))
