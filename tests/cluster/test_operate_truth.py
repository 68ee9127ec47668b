"""Operating a node: JSON logs, rate-limited warnings, messages that tell the truth,
and mistakes caught (non-empty fuse.dir, non-SQLite writes, deleted databases,
set-aside histories).

Real node processes, real FUSE mounts, real HTTP to their proxy, the real CLI.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import connect, etcd_node, replica_of, status, wait_same_pos
from tests.support.nodes import NodeProcess, free_port, wait_for


def _json_log(node: NodeProcess) -> None:
    text = node.config_path.read_text()
    node.config_path.write_text(text.replace("log:\n", "log:\n  format: json\n", 1))


def _proxy(proxy_port: int, app_port: int) -> str:
    return f"proxy:\n  addr: 127.0.0.1:{proxy_port}\n  target: 127.0.0.1:{app_port}\n  db: app.db\n"


def _static_replica_lease(primary_url: str, name: str) -> str:
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
        lease=_static_replica_lease(gone, "replica"),
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


# ------------------------------------------------------- config mistakes caught


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_mount_over_a_non_empty_directory_is_refused(node_factory) -> None:
    node: NodeProcess = node_factory("busy")
    node.mnt.mkdir(parents=True)
    (node.mnt / "app.db").write_bytes(b"the app's own data")
    res = _cli("mount", "-c", str(node.config_path))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0] == (
        f"litefspy: fuse.dir {node.mnt} is not empty (app.db): the mount would hide these "
        "files; move them elsewhere (import a database with `litefspy import`) or pick "
        "another fuse.dir"
    )
    assert (node.mnt / "app.db").read_bytes() == b"the app's own data"
    assert not node.data.exists()  # nothing was created


def test_refused_write_leaves_no_database_and_deleted_ones_are_forgotten(
    node_factory,
) -> None:
    primary: NodeProcess = node_factory("primary")
    text = primary.config_path.read_text().replace(
        f"data:\n  dir: {primary.data}\n",
        f"data:\n  dir: {primary.data}\n  retention: 1s\n  retention-monitor-interval: 200ms\n",
    )
    primary.config_path.write_text(text)
    primary.start()
    # Opened without O_TRUNC (not a copy), then a non-SQLite write: refused.
    with pytest.raises(OSError) as refused, open(primary.db("notes.db"), "a+") as f:
        f.write("hello, not a database\n")
    assert refused.value.errno == errno.EPERM
    assert not primary.db("notes.db").exists()
    assert not (primary.data / "dbs" / "notes.db").exists()
    assert [d["name"] for d in status(primary)["databases"]] == []

    replica = replica_of(node_factory, primary)
    replica.config_path.write_text(
        replica.config_path.read_text().replace(
            f"data:\n  dir: {replica.data}\n",
            f"data:\n  dir: {replica.data}\n  retention: 1s\n  retention-monitor-interval: 200ms\n",
        )
    )
    replica.start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")
    os.unlink(primary.db("app.db"))

    # Replicated as a deletion; past data.retention the deletion needs no record
    # any more: gone from the listings and from disk, on every node.
    for n in (primary, replica):
        wait_for(lambda n=n: status(n)["databases"] == [], 20, what=f"{n.name} to forget it")
        assert not (n.data / "dbs" / "app.db").exists()
        assert not n.db("app.db").exists()
        res = _cli("status", "--url", n.url)
        assert "app.db" not in res.stdout and "no databases" in res.stdout
    assert "deleted database forgotten after retention db=app.db" in replica.log()
    # The name can be used again, from scratch, and replicates.
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE u (y)")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")
    assert "removed the empty database a refused write left" in primary.log()


def test_aside_list_and_prune_through_the_cli(node: NodeProcess) -> None:
    conn = connect(node.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    db_dir = node.data / "dbs" / "app.db"
    now_ms = int(time.time() * 1000)
    old = db_dir / f"aside-{now_ms - 3 * 3600 * 1000}"
    old.mkdir()
    (old / "database").write_bytes(b"x" * 4096)
    (old / "0000000000000001-0000000000000001.ltx").write_bytes(b"y" * 100)
    wal = db_dir / f"wal.aside-{int(time.time()) - 2 * 86400}"
    wal.write_bytes(b"w" * 32)
    fresh = db_dir / f"aside-{now_ms - 10_000}"
    fresh.mkdir()

    res = _cli("aside", "list", "--data-dir", str(node.data), "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert [(a["db"], a["kind"], a["path"], a["size_bytes"]) for a in listed] == [
        ("app.db", "wal", f"dbs/app.db/{wal.name}", 32),
        ("app.db", "history", f"dbs/app.db/{old.name}", 4196),
        ("app.db", "history", f"dbs/app.db/{fresh.name}", 0),
    ]
    assert 3 * 3600 - 60 < listed[1]["age_seconds"] < 3 * 3600 + 60
    res = _cli("aside", "list", "app.db", "-c", str(node.config_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split() == [
        "DATABASE",
        "KIND",
        "SET",
        "ASIDE",
        "AGE",
        "SIZE",
        "PATH",
    ]
    assert f"dbs/app.db/{old.name}" in res.stdout and "3 h" in res.stdout

    # Bad input: one line, nothing lost.
    res = _cli("aside", "prune", "--older-than", "soon", "--data-dir", str(node.data))
    assert res.returncode == 2 and "invalid duration" in res.stderr
    res = _cli("aside", "prune", "other.db", "--data-dir", str(node.data))
    assert res.returncode == 1
    assert res.stderr == f"litefspy: no database named other.db in {node.data}\n"
    assert old.exists() and wal.exists()

    # While the node runs: only what is older than 1 day, then everything but the fresh one.
    res = _cli("aside", "prune", "--older-than", "24h", "--data-dir", str(node.data))
    assert res.returncode == 0, res.stderr
    assert not wal.exists() and old.exists()
    assert res.stdout.splitlines()[-1] == "removed 1 aside, 32 bytes"
    res = _cli("aside", "prune", "app.db", "--data-dir", str(node.data))
    assert res.returncode == 0, res.stderr
    assert not old.exists() and fresh.exists()
    assert res.stdout.splitlines()[-1] == (
        "removed 1 aside, 4196 bytes; kept 1 set aside less than 60 s ago"
    )
    # The database itself is untouched, and the node goes on.
    assert sqlite3.connect(node.db("app.db")).execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert sorted(p.name for p in db_dir.iterdir() if "aside" in p.name) == [fresh.name]
