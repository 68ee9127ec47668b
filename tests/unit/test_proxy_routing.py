"""Pure proxy helpers: routing, the __txid cookie, header rewriting, addresses."""

from __future__ import annotations

import pytest

from litefspy.errors import ConfigError
from litefspy.http.server import parse_listen_address
from litefspy.http.target import origin_form, request_path
from litefspy.proxy.routing import (
    Route,
    classify,
    is_upgrade,
    strip_hop_by_hop,
    txid_from_cookies,
    txid_set_cookie,
    upstream_request_headers,
)
from litefspy.proxy.server import target_url


def test_classify_methods_health_and_globs() -> None:
    assert classify(b"GET", "/") is Route.READ
    assert classify(b"HEAD", "/x") is Route.READ
    for method in (b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"):
        assert classify(method, "/") is Route.WRITE
    assert classify(b"GET", "/litefs/health") is Route.HEALTH
    assert classify(b"POST", "/litefs/health") is Route.WRITE
    assert classify(b"POST", "/img/a.png", passthrough=["*.png"]) is Route.PASSTHROUGH
    # passthrough wins over the health path and always-forward
    assert classify(b"GET", "/litefs/health", passthrough=["/litefs/*"]) is Route.PASSTHROUGH
    assert (
        classify(b"GET", "/admin/x", passthrough=["/admin/*"], always_forward=["/admin/*"])
        is Route.PASSTHROUGH
    )
    assert classify(b"GET", "/admin/users", always_forward=["/admin/*"]) is Route.WRITE
    assert classify(b"GET", "/public", always_forward=["/admin/*"]) is Route.READ
    # case-sensitive, like a URL path
    assert classify(b"GET", "/A.PNG", passthrough=["*.png"]) is Route.READ


def test_request_path_and_origin_form() -> None:
    assert request_path(b"/a%20b/c?x=1") == "/a b/c"
    assert origin_form(b"/a?x=1") == b"/a?x=1"
    assert origin_form(b"http://example.com/p/q?z=2") == b"/p/q?z=2"
    assert origin_form(b"http://example.com") == b"/"
    assert request_path(b"http://example.com/x.png?v=3") == "/x.png"


@pytest.mark.parametrize(
    ("cookie", "txid"),
    [
        (b"__txid=000000000000002a", 42),
        (b"a=1; __txid=00000000000000FF; b=2", 255),
        (b'__txid="0000000000000010"', 16),
        (b"__txid=2a", None),  # LiteFS format is exactly 16 hex digits
        (b"__txid=zzzzzzzzzzzzzzzz", None),
        (b"other=000000000000002a", None),
        (b"__txid", None),
    ],
)
def test_txid_from_cookies(cookie: bytes, txid: int | None) -> None:
    assert txid_from_cookies([(b"cookie", cookie)]) == txid


def test_txid_from_several_cookie_headers() -> None:
    headers = [(b"cookie", b"a=1"), (b"host", b"x"), (b"Cookie", b"__txid=0000000000000007")]
    assert txid_from_cookies(headers) == 7


def test_set_cookie_format() -> None:
    name, value = txid_set_cookie(0x1F, 5)
    assert name == b"set-cookie"
    assert value == b"__txid=000000000000001f; Path=/; Max-Age=5; HttpOnly"


def test_strip_hop_by_hop_and_connection_named_headers() -> None:
    headers = [
        (b"Host", b"app"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"Content-Type", b"text/plain"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"app"), (b"content-type", b"text/plain")]
    kept = strip_hop_by_hop(headers, upgrade=True)
    assert (b"upgrade", b"websocket") in kept
    assert (b"connection", b"upgrade") in kept
    assert (b"x-secret", b"1") not in kept


def test_upstream_headers_keep_host_and_extend_forwarded_for() -> None:
    headers = [
        (b"host", b"example.com"),
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"expect", b"100-continue"),
        (b"litefspy-forwarded", b"1"),
        (b"content-length", b"3"),
    ]
    out = upstream_request_headers(headers, client_ip="10.0.0.2")
    assert (b"host", b"example.com") in out
    assert (b"content-length", b"3") in out
    assert (b"x-forwarded-for", b"203.0.113.9, 10.0.0.2") in out
    assert all(k not in (b"expect", b"litefspy-forwarded") for k, _ in out)
    forwarded = upstream_request_headers(headers, client_ip="10.0.0.2", forwarded=True)
    assert (b"litefspy-forwarded", b"1") in forwarded


def test_is_upgrade() -> None:
    assert is_upgrade([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")])
    assert is_upgrade([(b"connection", b"keep-alive, upgrade"), (b"upgrade", b"h2c")])
    assert not is_upgrade([(b"upgrade", b"websocket")])
    assert not is_upgrade([(b"connection", b"upgrade")])


def test_listen_address_parsing() -> None:
    assert parse_listen_address(":8080", "proxy.addr") == (None, 8080)
    assert parse_listen_address("127.0.0.1:0", "proxy.addr") == ("127.0.0.1", 0)
    assert parse_listen_address("[::1]:9", "proxy.addr") == ("::1", 9)
    for bad in ("8080", "host:", "host:port", ":70000"):
        with pytest.raises(ConfigError, match=r"invalid metrics\.addr"):
            parse_listen_address(bad, "metrics.addr")


def test_target_url() -> None:
    assert str(target_url("localhost:8081")) == "http://localhost:8081"
    assert str(target_url(":8081")) == "http://localhost:8081"
    assert str(target_url("http://app:3000")) == "http://app:3000"
    with pytest.raises(ConfigError, match=r"proxy\.target"):
        target_url("")
    with pytest.raises(ConfigError, match=r"proxy\.target"):
        target_url("ftp://x:1")
