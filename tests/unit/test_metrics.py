"""Prometheus metrics: scraped over real HTTP and parsed with prometheus-client's parser."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from litefspy.errors import ConfigError
from litefspy.metrics import DbStats, Metrics, ReplicaLink, ReplicationStats
from litefspy.proxy import ListenError


class FakeSource:
    def __init__(self) -> None:
        self.dbs = [
            DbStats("app.db", txid=42, commits=40, ltx_files=3, ltx_bytes=12288, lag_seconds=0.0,
                    replicas=2),
            DbStats("other.db", txid=7, commits=7, ltx_files=1, ltx_bytes=4096, lag_seconds=0.0,
                    replicas=1),
        ]  # fmt: skip
        self.primary = True
        self.epoch = 3
        self.streams = 2
        self.fuse: dict[str, int] = {"read": 10, "write": 4}
        self.fail = False
        self.lag = 0.0
        self.is_ready = True
        self.repl = ReplicationStats()

    def databases(self) -> Sequence[DbStats]:
        if self.fail:
            raise RuntimeError("store is closed")
        return self.dbs

    def role_is_primary(self) -> bool:
        return self.primary

    def backup_report(self) -> None:
        return None

    def lease_epoch(self) -> int:
        return self.epoch

    def stream_count(self) -> int:
        return self.streams

    def fuse_request_counts(self) -> Mapping[str, int]:
        return self.fuse

    def lag_seconds(self) -> float:
        return self.lag

    def ready(self) -> bool:
        return self.is_ready

    def replication(self) -> ReplicationStats:
        return self.repl


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@asynccontextmanager
async def serving(metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(metrics.serve, "127.0.0.1:0"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as c:
            yield c
        nursery.cancel_scope.cancel()


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def db(name: str) -> tuple[tuple[str, str], ...]:
    return (("db", name),)


async def test_scrape_reports_the_source() -> None:
    source = FakeSource()
    metrics = Metrics(source)
    metrics.observe_fuse("read", 0.0003)
    metrics.observe_fuse("read", 0.002)
    metrics.observe_fuse("write", 0.3)
    async with serving(metrics) as client:
        s = await scrape(client)
    assert s[("litefspy_db_txid", db("app.db"))] == 42
    assert s[("litefspy_db_txid", db("other.db"))] == 7
    assert s[("litefspy_db_commits_total", db("app.db"))] == 40
    assert s[("litefspy_db_ltx_files", db("app.db"))] == 3
    assert s[("litefspy_db_ltx_bytes", db("app.db"))] == 12288
    assert s[("litefspy_db_lag_seconds", db("app.db"))] == 0
    assert s[("litefspy_db_replicas", db("app.db"))] == 2
    assert s[("litefspy_node_role", ())] == 1
    assert s[("litefspy_lease_epoch", ())] == 3
    assert s[("litefspy_streams", ())] == 2
    assert s[("litefspy_fuse_requests_total", (("op", "read"),))] == 10
    assert s[("litefspy_fuse_requests_total", (("op", "write"),))] == 4
    read = (("op", "read"),)
    assert s[("litefspy_fuse_request_seconds_count", read)] == 2
    assert s[("litefspy_fuse_request_seconds_sum", read)] == pytest.approx(0.0023)
    assert s[("litefspy_fuse_request_seconds_bucket", (("le", "0.0005"), ("op", "read")))] == 1
    assert s[("litefspy_fuse_request_seconds_bucket", (("le", "0.0025"), ("op", "read")))] == 2
    assert s[("litefspy_fuse_request_seconds_bucket", (("le", "0.25"), ("op", "write")))] == 0
    assert s[("litefspy_fuse_request_seconds_bucket", (("le", "+Inf"), ("op", "write")))] == 1


async def test_replication_readiness_proxy_and_process_families() -> None:
    source = FakeSource()
    source.dbs = []
    source.lag, source.is_ready = 3.5, False
    source.repl = ReplicationStats(
        files_sent=7,
        snapshots_sent=1,
        bytes_sent=9000,
        send_errors=2,
        replicas=[ReplicaLink("r1", True), ReplicaLink("r2", False)],
        bytes_received=5,
        receive_errors=4,
    )
    metrics = Metrics(source)
    metrics.observe_proxy("read", "ok", 0.003)
    metrics.observe_proxy("write", "replay", 0.0004)
    metrics.observe_proxy("write", "replay", 0.02)
    async with serving(metrics) as client:
        s = await scrape(client)
    assert s[("litefspy_lag_seconds", ())] == 3.5  # no databases, still a lag
    assert s[("litefspy_ready", ())] == 0
    assert s[("litefspy_replication_files_sent_total", ())] == 7
    assert s[("litefspy_replication_snapshots_sent_total", ())] == 1
    assert s[("litefspy_replication_bytes_sent_total", ())] == 9000
    assert s[("litefspy_replication_bytes_received_total", ())] == 5
    assert s[("litefspy_replication_errors_total", (("side", "send"),))] == 2
    assert s[("litefspy_replication_errors_total", (("side", "receive"),))] == 4
    assert s[("litefspy_replica_connected", (("replica", "r1"),))] == 1
    assert s[("litefspy_replica_connected", (("replica", "r2"),))] == 0
    assert s[("litefspy_primary_connected", ())] == 0
    replay = (("outcome", "replay"), ("route", "write"))
    assert s[("litefspy_proxy_request_seconds_count", replay)] == 2
    assert s[("litefspy_proxy_request_seconds_sum", replay)] == pytest.approx(0.0204)
    ok = (("le", "0.005"), ("outcome", "ok"), ("route", "read"))
    assert s[("litefspy_proxy_request_seconds_bucket", ok)] == 1
    # prometheus-client's process collector, on the registry /metrics serves.
    assert s[("process_resident_memory_bytes", ())] > 0
    assert s[("process_open_fds", ())] > 0


async def test_values_follow_the_source_between_scrapes() -> None:
    source = FakeSource()
    metrics = Metrics(source)
    async with serving(metrics) as client:
        first = await scrape(client)
        source.dbs = [
            DbStats("app.db", txid=50, commits=3, ltx_files=5, ltx_bytes=1, lag_seconds=1.25,
                    replicas=0),
        ]  # fmt: skip
        source.primary = False
        source.epoch = 4
        source.streams = 1
        source.fuse["lookup"] = 99
        second = await scrape(client)
    assert first[("litefspy_db_txid", db("app.db"))] == 42
    assert second[("litefspy_db_txid", db("app.db"))] == 50
    assert second[("litefspy_db_lag_seconds", db("app.db"))] == 1.25
    assert ("litefspy_db_txid", db("other.db")) not in second  # a dropped database disappears
    assert second[("litefspy_node_role", ())] == 0
    assert second[("litefspy_lease_epoch", ())] == 4
    assert second[("litefspy_streams", ())] == 1
    assert second[("litefspy_fuse_requests_total", (("op", "lookup"),))] == 99


async def test_registries_are_private() -> None:
    """Two nodes in one process each see only their own numbers."""
    a, b = FakeSource(), FakeSource()
    b.epoch = 9
    ma, mb = Metrics(a), Metrics(b)
    ma.observe_fuse("read", 0.001)
    text_a = ma.render()[0].decode()
    text_b = mb.render()[0].decode()
    assert parse(text_a)[("litefspy_lease_epoch", ())] == 3
    assert parse(text_b)[("litefspy_lease_epoch", ())] == 9
    assert "litefspy_fuse_request_seconds_count" not in text_b
    assert "python_gc" not in text_a  # not the global registry's default collectors


async def test_openmetrics_negotiation_other_paths_and_methods() -> None:
    metrics = Metrics(FakeSource())
    async with serving(metrics) as client:
        r = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.rstrip().endswith("# EOF")
        r = await client.get("/")
        assert r.status_code == 404
        assert "/metrics" in r.text
        r = await client.post("/metrics")
        assert r.status_code == 405
        r = await client.head("/metrics")
        assert r.status_code == 200 and r.content == b""


async def test_failing_source_is_500_and_the_server_survives() -> None:
    source = FakeSource()
    metrics = Metrics(source)
    async with serving(metrics) as client:
        source.fail = True
        r = await client.get("/metrics")
        assert r.status_code == 500
        assert "metrics error" in r.text
        source.fail = False
        assert (await scrape(client))[("litefspy_streams", ())] == 2


async def test_bad_addr_is_a_clear_error() -> None:
    metrics = Metrics(FakeSource())
    with pytest.raises(ConfigError, match=r'invalid metrics\.addr "localhost"'):
        await metrics.serve("localhost")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ListenError, match=rf"cannot listen on metrics\.addr 127\.0\.0\.1:{port}"
        ):
            await metrics.serve(f"127.0.0.1:{port}")


async def test_all_interfaces_address() -> None:
    """`:PORT` listens on every interface (reached here through loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = Metrics(FakeSource())
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(metrics.serve, f":{port}"))
        assert bound == port
        async with httpx.AsyncClient(trust_env=False) as client:
            r = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert r.status_code == 200
        nursery.cancel_scope.cancel()
