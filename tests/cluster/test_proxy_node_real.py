"""The proxy and metrics endpoints of real node processes (a primary and a replica)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import connect, replica_lease, wait_same_pos
from tests.support.nodes import NodeProcess, free_port, wait_for


def _extras(proxy_port: int, app_port: int, metrics_port: int) -> str:
    return (
        f"proxy:\n  addr: 127.0.0.1:{proxy_port}\n  target: 127.0.0.1:{app_port}\n"
        f"  db: app.db\nmetrics:\n  addr: 127.0.0.1:{metrics_port}\n"
    )


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_replica_proxy_and_metrics(node_factory, tmp_path: Path) -> None:
    app_port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("the app")
    app = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(app_port), "--bind", "127.0.0.1"],
        cwd=tmp_path / "www",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        p_ports = (free_port(), app_port, free_port())
        r_ports = (free_port(), app_port, free_port())
        primary: NodeProcess = node_factory("primary", config_extra=_extras(*p_ports)).start()
        replica: NodeProcess = node_factory(
            "replica", lease=replica_lease(primary, "replica"), config_extra=_extras(*r_ports)
        ).start()
        conn = connect(primary.db("app.db"), "wal")
        conn.execute("CREATE TABLE t (x)")
        wait_same_pos(primary, [replica], "app.db")
        wait_for(lambda: _listening(app_port), 10, what="the app")

        proxy = f"http://127.0.0.1:{r_ports[0]}"
        assert httpx.get(f"{proxy}/litefs/health", trust_env=False).status_code == 200
        r = httpx.post(f"{proxy}/form", content=b"x=1", trust_env=False)
        assert r.status_code == 200 and r.headers["fly-replay"] == "instance=primary"

        # A read carrying the TXID of a write not yet replicated waits for it.
        txid = primary.pos("app.db")[0]
        answered: list[httpx.Response] = []

        def read() -> None:
            cookies = {"cookie": f"__txid={txid + 1:016x}"}
            answered.append(httpx.get(f"{proxy}/", headers=cookies, trust_env=False, timeout=10))

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(0.5)
        assert not answered
        conn.execute("INSERT INTO t VALUES (1)")
        conn.close()
        reader.join(10)
        assert answered and answered[0].status_code == 200 and "the app" in answered[0].text

        wait_same_pos(primary, [replica], "app.db")
        db = (("db", "app.db"),)
        on_replica = _samples(r_ports[2])
        assert on_replica[("litefspy_db_txid", db)] == txid + 1
        assert on_replica[("litefspy_node_role", ())] == 0
        assert on_replica[("litefspy_db_commits_total", db)] >= 1
        on_primary = _samples(p_ports[2])
        assert on_primary[("litefspy_node_role", ())] == 1
        assert on_primary[("litefspy_db_replicas", db)] == 1
        assert on_primary[("litefspy_db_ltx_files", db)] == len(primary.ltx_files("app.db"))
    finally:
        app.kill()
        app.wait()
