"""What an operator reads: JSON logs, rate-limited warnings, messages that tell the truth.

Real node processes, real HTTP to their proxy, the real CLI.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.cluster import etcd_node
from tests.nodes import NodeProcess, free_port, wait_for


def _json_log(node: NodeProcess) -> None:
    text = node.config_path.read_text()
    node.config_path.write_text(text.replace("log:\n", "log:\n  format: json\n", 1))


def _proxy(proxy_port: int, app_port: int) -> str:
    return f"proxy:\n  addr: 127.0.0.1:{proxy_port}\n  target: 127.0.0.1:{app_port}\n  db: app.db\n"


def replica_lease(primary_url: str, name: str) -> str:
    return (
        "lease:\n  type: static\n  candidate: false\n"
        f"  hostname: {name}\n  advertise-url: {primary_url}\n  reconnect-delay: 100ms\n"
    )


def _records(node: NodeProcess) -> list[dict[str, Any]]:
    lines = node.log_path.read_text().splitlines()
    # Every line the node writes is one JSON object (nothing else on stderr).
    return [json.loads(line) for line in lines if line.strip()]


def test_json_logs_rate_limited_warnings_and_no_primary_answers(node_factory) -> None:
    """A replica whose static primary is down: JSON fields, one warning, truthful 503s."""
    proxy_port, app_port = free_port(), free_port()  # nothing listens on app_port
    gone = f"http://127.0.0.1:{free_port()}"  # the static primary: never started
    node: NodeProcess = node_factory(
        "replica",
        lease=replica_lease(gone, "replica"),
        config_extra=_proxy(proxy_port, app_port),
    )
    _json_log(node)
    node.start()
    base = f"http://127.0.0.1:{proxy_port}"
    with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
        wait_for(lambda: _try_get(client), 20, what="the proxy to listen")
        for _ in range(20):
            r = client.get("/page")
            assert r.status_code == 502
            assert "cannot reach the application" in r.text
        r = client.post("/write")
        assert r.status_code == 503
        assert r.text == (
            f"proxy error: no primary (not connected to the static primary at {gone}); retry\n"
        )
        r = client.post("/write", headers={"litefspy-forwarded": "1"})
        assert r.status_code == 503
        assert "but there is no primary (not connected to the static primary" in r.text
        assert "the primary changed" not in r.text

    records = _records(node)
    failed = [r for r in records if r["msg"] == "proxy upstream failed"]
    # 21 proxied requests failed (the wait included); one warning within the window.
    assert len(failed) == 1, failed
    assert failed[0]["level"] == "warning"
    assert failed[0]["upstream"] == f"http://127.0.0.1:{app_port}"
    assert "error" in failed[0]
    # The fields are JSON keys, not text inside msg.
    assert not [r for r in records if r["logger"].startswith("litefspy") and "=" in r["msg"]]
    started = [r for r in records if r["msg"] == "lock keeper started"]
    assert started and isinstance(started[0]["pid"], int)


def _try_get(client: httpx.Client) -> bool:
    try:
        client.get("/litefs/health")
    except httpx.TransportError:
        return False
    return True


def test_etcd_outage_forwarded_write_says_lease_unreachable(node_factory) -> None:
    """With etcd unreachable, a write says there is no primary because of it."""
    proxy_port = free_port()
    dead_etcd = f"http://127.0.0.1:{free_port()}"
    node = etcd_node(
        node_factory,
        dead_etcd,
        "truth/primary",
        "lonely",
        config_extra=_proxy(proxy_port, free_port()),
    )
    node.start()
    base = f"http://127.0.0.1:{proxy_port}"
    with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
        wait_for(lambda: _try_get(client), 20, what="the proxy to listen")
        r = client.post("/write", headers={"litefspy-forwarded": "1"})
        assert r.status_code == 503
        assert "but there is no primary (lease unreachable: " in r.text, r.text
        assert dead_etcd.removeprefix("http://") in r.text
        r = client.post("/write")
        assert r.status_code == 503
        assert r.text.startswith("proxy error: no primary (lease unreachable: ")
