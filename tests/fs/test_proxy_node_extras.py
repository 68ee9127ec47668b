"""`serve_extras`: the proxy and the metrics endpoint wired to a node's store."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from litefspy.cluster.adapters import NodeProxyState
from litefspy.node import serve_extras
from litefspy.proxy import ListenError, TxidWaiters
from litefspy.store.store import Store
from tests.support.nodes import free_port
from tests.support.services_harness import FakeNode, make_config, mounted_node, run_sql


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_proxy_and_metrics_follow_the_store(tmp_path: Path) -> None:
    app_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello from the app")
    proxy = {"addr": f"127.0.0.1:{proxy_port}", "target": f"127.0.0.1:{app_port}", "db": "app.db"}
    extra = {"proxy": proxy, "metrics": {"addr": f"127.0.0.1:{metrics_port}"}}
    app = await trio.lowlevel.open_process(
        [sys.executable, "-m", "http.server", str(app_port), "--bind", "127.0.0.1"],
        cwd=tmp_path / "www",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with mounted_node(tmp_path / "node", **extra) as n, trio.open_nursery() as nursery:
            db = n.db("app.db")
            await trio.to_thread.run_sync(run_sql, db, "CREATE TABLE t (x);", "wal")
            with trio.fail_after(10):
                while not await trio.to_thread.run_sync(_listening, app_port):
                    await trio.sleep(0.05)
            await nursery.start(serve_extras, n.node)
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}", trust_env=False)
            scraper = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{metrics_port}", trust_env=False
            )
            async with client, scraper:
                r = await client.get("/litefs/health")
                assert r.status_code == 200
                r = await client.get("/")
                assert r.status_code == 200 and "hello from the app" in r.text

                # Read-your-writes: a read carrying a TXID not yet reached waits for
                # the commit that reaches it.
                txid = n.store.get("app.db").pos.txid  # type: ignore[union-attr]
                answered: list[httpx.Response] = []

                async def read_after_write() -> None:
                    cookie = {"cookie": f"__txid={txid + 1:016x}"}
                    answered.append(await client.get("/", headers=cookie))

                nursery.start_soon(read_after_write)
                await trio.sleep(0.5)
                assert not answered
                await trio.to_thread.run_sync(run_sql, db, "INSERT INTO t VALUES (1);")
                with trio.fail_after(5):
                    while not answered:
                        await trio.sleep(0.01)
                assert answered[0].status_code == 200

                samples = _samples((await scraper.get("/metrics")).text)
                label = (("db", "app.db"),)
                pos = n.store.get("app.db").pos  # type: ignore[union-attr]
                ltx_files = sorted(n.store.get("app.db").ltx_dir.glob("*.ltx"))  # type: ignore[union-attr]
                assert samples[("litefspy_db_txid", label)] == pos.txid
                # Commits since the services started: the one INSERT above.
                assert samples[("litefspy_db_commits_total", label)] == 1
                assert samples[("litefspy_db_ltx_files", label)] == len(ltx_files)
                assert samples[("litefspy_db_ltx_bytes", label)] == sum(
                    p.stat().st_size for p in ltx_files
                )
                assert samples[("litefspy_node_role", ())] == 1
                assert samples[("litefspy_fuse_requests_total", (("op", "write"),))] > 0
                # FUSE latency is observed from the time the metrics started.
                assert samples[("litefspy_fuse_request_seconds_count", (("op", "write"),))] > 0

                # As a replica: writes are sent to the primary (fly-replay), role is 0.
                n.node.set_role(False, "node-p")
                n.node.lag = 2500
                r = await client.post("/form", content=b"x=1")
                assert r.status_code == 200 and r.headers["fly-replay"] == "instance=node-p"
                samples = _samples((await scraper.get("/metrics")).text)
                assert samples[("litefspy_node_role", ())] == 0
                assert samples[("litefspy_db_lag_seconds", label)] == 2.5
            nursery.cancel_scope.cancel()
    finally:
        app.kill()
        await app.wait()


async def test_bad_listen_address_fails_the_start(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = make_config(tmp_path, metrics={"addr": f"127.0.0.1:{port}"})
        store = Store(Path(config.data.dir))
        node = FakeNode(config, store)
        async with trio.open_nursery() as nursery:
            # Raised by nursery.start itself, not wrapped in an exception group.
            with pytest.raises(ListenError, match=f"metrics.addr 127.0.0.1:{port}"):
                await nursery.start(serve_extras, node)
        assert len(store.feed) == 0  # unsubscribed again
    finally:
        taken.close()


async def test_forward_url_uses_the_primary_hostname_and_proxy_port(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, proxy={"addr": ":8080", "target": "localhost:3000", "db": "app.db"}
    )
    node = FakeNode(config)
    state = NodeProxyState(node, TxidWaiters(lambda db: 0))
    node.primary_host = "node-p"
    assert state.primary_proxy_url() == "http://node-p:8080"
    node.primary_host = "fd00::1"
    assert state.primary_proxy_url() == "http://[fd00::1]:8080"
    node.primary_host = None
    assert state.primary_proxy_url() is None
