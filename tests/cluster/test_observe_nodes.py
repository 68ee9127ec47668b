"""Operating a node: readiness, progress of long work, metrics, fast clean restarts.

Real node processes, the real CLI (`litefspy status`, `import`, `export`), real
HTTP to the proxy's health check and the metrics endpoint.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from litefspy.cli.status import render_status
from litefspy.rpc.client import fetch_status
from litefspy.rpc.convert import status_to_dict
from tests.support.cluster import connect, replica_of, status, wait_same_pos
from tests.support.nodes import NodeProcess, free_port, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _extras(proxy_port: int, metrics_port: int) -> str:
    return (
        f"proxy:\n  addr: 127.0.0.1:{proxy_port}\n  target: 127.0.0.1:{free_port()}\n"
        f"  db: app.db\nmetrics:\n  addr: 127.0.0.1:{metrics_port}\n"
    )


def _metrics(port: int) -> Samples:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=10)
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _health(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/litefs/health", trust_env=False, timeout=10)


def _first_health(port: int) -> httpx.Response:
    """The health check once the proxy listens (it starts right after the mount)."""

    def answer() -> httpx.Response | None:
        try:
            return _health(port)
        except httpx.ConnectError:
            return None

    response: httpx.Response = wait_for(answer, 10, what="the proxy to listen")
    return response


def quick_status(node: NodeProcess) -> dict[str, Any]:
    """The object `status --json` prints, fetched in-process (no interpreter start)."""
    return status_to_dict(fetch_status(node.url))


def full_log(node: NodeProcess) -> str:
    """The node's whole log (NodeProcess.log keeps the tail only)."""
    return node.log_path.read_text(errors="replace")


def litefspy(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **env},
    )


def test_replica_not_ready_until_first_catch_up_then_metrics(node_factory) -> None:
    """Health, status and the mount say "not ready" until the first catch-up; the
    metrics show both sides of replication, the proxy and the process."""
    p_proxy, p_metrics, r_proxy, r_metrics = free_port(), free_port(), free_port(), free_port()
    primary: NodeProcess = node_factory("primary", config_extra=_extras(p_proxy, p_metrics))
    replica = replica_of(node_factory, primary, config_extra=_extras(r_proxy, r_metrics))
    replica.start()  # its primary is not running yet

    r = _first_health(r_proxy)
    assert r.status_code == 503
    assert r.text.startswith("not ready: not connected to the primary at http://")
    st = quick_status(replica)
    assert st["ready"] is False
    assert "not connected to the primary" in st["not_ready_reason"]
    # The table `litefspy status` prints (the CLI itself is run below: an
    # interpreter start here would let the replica's reconnect backoff grow).
    assert "ready:    false (not connected to the primary" in render_status(st)

    # An application asks the replica for a database it never received: an
    # error (not an empty database), and the node says why.
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        sqlite3.connect(replica.mnt / "app.db").execute("SELECT * FROM sqlite_master")
    assert not (replica.data / "dbs" / "app.db" / "database").exists()
    wait_for(lambda: "database not replicated yet" in full_log(replica), 10, what="the warning")
    assert "app.db" in quick_status(replica)["not_ready_reason"]

    # The proxy records a request right after answering it: scrape until it has.
    health_503 = (("outcome", "error"), ("route", "health"))
    m = wait_for(
        lambda: (
            (m := _metrics(r_metrics)).get(("litefspy_proxy_request_seconds_count", health_503))
            and m
        ),
        10,
        what="the health check counted",
    )
    assert m[("litefspy_proxy_request_seconds_count", health_503)] == 1
    assert m[("litefspy_ready", ())] == 0
    assert m[("litefspy_primary_connected", ())] == 0
    assert m[("litefspy_lag_seconds", ())] > 0  # no databases, still a lag
    assert m[("litefspy_replication_errors_total", (("side", "receive"),))] >= 1
    assert m[("process_resident_memory_bytes", ())] > 0
    assert m[("process_open_fds", ())] > 0
    assert m[("process_cpu_seconds_total", ())] > 0

    primary.start()
    conn = connect(primary.db("app.db"), "wal")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (randomblob(20000))")
    conn.close()
    wait_same_pos(primary, [replica], "app.db", timeout=30)
    wait_for(lambda: quick_status(replica)["ready"], 10, what="replica ready")
    st = status(replica)
    assert st["ready"] is True
    assert st["not_ready_reason"] is None
    assert _health(r_proxy).status_code == 200
    assert _health(p_proxy).status_code == 200
    assert "ready:    true" in litefspy("status", "--url", replica.url).stdout
    reply = httpx.post(f"http://127.0.0.1:{r_proxy}/x", content=b"a=1", trust_env=False)
    assert reply.headers["fly-replay"] == "instance=primary"

    replay = (("outcome", "replay"), ("route", "write"))
    m = wait_for(
        lambda: (
            (m := _metrics(r_metrics)).get(("litefspy_proxy_request_seconds_count", replay)) and m
        ),
        10,
        what="the write counted",
    )
    assert m[("litefspy_ready", ())] == 1
    assert m[("litefspy_primary_connected", ())] == 1
    assert m[("litefspy_replication_files_applied_total", ())] >= 1
    received = m[("litefspy_replication_bytes_received_total", ())]
    assert received > 20000
    assert m[("litefspy_lag_seconds", ())] < 5
    ok = (("outcome", "ok"), ("route", "health"))
    assert m[("litefspy_proxy_request_seconds_count", ok)] == 1
    assert m[("litefspy_proxy_request_seconds_count", replay)] == 1

    pm = _metrics(p_metrics)
    assert pm[("litefspy_ready", ())] == 1
    assert pm[("litefspy_replica_connected", (("replica", "replica"),))] == 1
    assert pm[("litefspy_replication_bytes_sent_total", ())] == received
    assert pm[("litefspy_replication_files_sent_total", ())] >= 1
    assert pm[("litefspy_replication_errors_total", (("side", "send"),))] == 0
    [rep] = quick_status(primary)["replicas"]
    assert rep["ready"] is True

    replica.stop()
    wait_for(
        lambda: _metrics(p_metrics)[("litefspy_replica_connected", (("replica", "replica"),))] == 0,
        10,
        what="the replica shown as gone",
    )


def _source_db(path: Path, mib: int) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(4000))", [()] * (mib * 256))
    conn.commit()
    conn.close()
    return path


def test_import_export_progress_in_status_cli_and_logs(
    node_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import waiting for SQLite's locks is listed by status with its phase; the
    CLI prints progress lines (no terminal) and the node logs them."""
    monkeypatch.setenv("LITEFSPY_PROGRESS_INTERVAL", "0.01")
    primary = node_factory("primary").start()
    conn = connect(primary.db("app.db"), "delete")
    conn.execute("CREATE TABLE old (x)")
    conn.close()
    src = _source_db(tmp_path / "src.db", 8)
    size = src.stat().st_size

    # A reader keeps its SHARED lock: the import has to wait for it.
    reader = sqlite3.connect(primary.db("app.db"), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM old").fetchall()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "litefspy",
            "import",
            "--name",
            "app.db",
            str(src),
            "--url",
            primary.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert cli.stderr is not None
    lines: list[str] = []
    stderr_reader = threading.Thread(target=lambda: lines.extend(cli.stderr or []), daemon=True)
    stderr_reader.start()
    try:

        def waiting() -> dict[str, Any] | None:
            for work in quick_status(primary)["progress"]:
                if work["kind"] == "import" and work["phase"] == "waiting for SQLite locks":
                    return dict(work)
            return None

        work = wait_for(waiting, 30, interval=0.05, what="the import listed by status")
        assert work["name"] == "app.db"
        assert work["done_bytes"] == work["total_bytes"] == size
        assert work["percent"] == 100.0
        table = litefspy("status", "--url", primary.url).stdout
        assert "WORK" in table and "import  app.db" in table
        assert "waiting for SQLite locks" in table
        # The CLI follows the node's side too.
        wait_for(
            lambda: any("waiting for SQLite locks" in line for line in list(lines)),
            30,
            what="the CLI to show the node's phase",
        )
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert cli.wait(60) == 0, "".join(lines)
    stderr_reader.join(10)
    assert cli.stdout is not None
    out = cli.stdout.read()
    cli.stdout.close()
    cli.stderr.close()
    assert out.startswith(f"imported {src} as app.db: txid ")
    err = "".join(lines)
    assert lines[-1].startswith("import app.db: ") and lines[-1].endswith("(100%)\n"), err
    assert any(line.startswith("import app.db: ") and ", " in line for line in lines), err
    assert status(primary)["progress"] == []
    log = full_log(primary)
    assert "import in progress db=app.db" in log
    assert "import done db=app.db" in log

    out_path = tmp_path / "copy.db"
    exported = litefspy("export", "--name", "app.db", str(out_path), "--url", primary.url)
    assert exported.returncode == 0, exported.stderr
    last = exported.stderr.splitlines()[-1]
    assert (
        last
        == f"export app.db: receiving: {size / 1048576:.1f}MiB of {size / 1048576:.1f}MiB (100%)"
    )
    check = sqlite3.connect(out_path)
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 8 * 256
    check.close()
    assert "export in progress db=app.db" in full_log(primary)

    # A history longer than a new replica replays: it catches up by a snapshot,
    # which both sides log as progress.
    conn = connect(primary.db("app.db"))
    for i in range(17):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.close()
    replica = replica_of(node_factory, primary).start()
    wait_same_pos(primary, [replica], "app.db")
    assert status(replica)["replication"]["snapshots_applied"] == 1
    assert "snapshot-send done db=app.db" in full_log(primary)
    assert 'phase="sending to replica"' in full_log(primary)
    assert "snapshot-receive done db=app.db" in full_log(replica)


def test_clean_restart_skips_the_startup_read_unless_the_file_changed(node_factory) -> None:
    """A clean stop saves the page checksums: the next start trusts them while the
    files are untouched, and reads the database in full when they are not."""
    node = node_factory("primary").start()
    conn = connect(node.db("app.db"), "delete")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 50)
    conn.close()
    pos = node.pos("app.db")
    assert node.stop() == 0
    assert (node.data / "dbs" / "app.db" / "clean.sums").exists()

    node.start()
    assert node.pos("app.db") == pos
    assert "startup check skipped: untouched since a clean stop db=app.db" in full_log(node)
    assert not (node.data / "dbs" / "app.db" / "clean.sums").exists()  # consumed
    conn = connect(node.db("app.db"))
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    pos = node.pos("app.db")
    assert node.stop() == 0

    # Touched while stopped (same bytes, new mtime): the full check runs.
    database = node.data / "dbs" / "app.db" / "database"
    os.utime(database, ns=(time.time_ns(), time.time_ns()))
    node.start()
    assert "database changed since the clean stop; checking it in full db=app.db" in full_log(node)
    assert node.pos("app.db") == pos
    conn = connect(node.db("app.db"))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 51
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()

    # A crash leaves no record: the next start reads everything again.
    node.kill()
    node.start()
    assert node.pos("app.db") == pos
    log = full_log(node)
    assert log.count("startup check skipped") == 1
