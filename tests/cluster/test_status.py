"""`litefspy status`, `.primary` and `.lag` on a primary and a replica."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litefspy.cli.common import FALLBACK_URL, default_url
from tests.support.cluster import connect, replica_of, status, wait_same_pos
from tests.support.nodes import NodeProcess, free_port, wait_for

MODES = {"a.db": "wal", "b.db": "persist", "c.db": "truncate", "d.db": "delete"}


def node_id(node: NodeProcess) -> str:
    return (node.data / "id").read_text().strip()


def lag(node: NodeProcess) -> int:
    text = (node.mnt / ".lag").read_text()
    assert re.fullmatch(r"[+-]\d{9}\n", text), text
    return int(text)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(cwd) if cwd else os.environ.get("HOME", "/"))
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_status_primary_lag_on_primary_and_replica(node_factory) -> None:
    primary = node_factory("primary").start()
    replica = replica_of(node_factory, primary, "replica").start()
    for name, mode in MODES.items():
        conn = connect(primary.db(name), mode)
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (randomblob(5000))")
        conn.close()
    for name in MODES:
        wait_same_pos(primary, [replica], name)

    st = status(primary)
    me = {"id": node_id(primary), "hostname": "primary", "advertise_url": primary.url}
    assert st["node"] == me
    assert st["role"] == "primary"
    assert st["primary"] == me
    assert st["lease"] == {"type": "static", "epoch": 1, "expires_in_ms": None}
    assert [d["name"] for d in st["databases"]] == sorted(MODES)
    for d in st["databases"]:
        txid, checksum = primary.pos(d["name"])
        assert d["txid"] == f"{txid:016x}"
        assert d["checksum"] == f"{checksum:016x}"
        assert d["journal_mode"] == MODES[d["name"]]
        assert d["size_bytes"] == 3 * 4096
        assert d["lag_ms"] == 0
    [rep] = st["replicas"]
    assert rep["node"] == node_id(replica)
    assert rep["hostname"] == "replica"
    assert rep["databases"] == [
        {"name": name, "txid": f"{primary.pos(name)[0]:016x}"} for name in sorted(MODES)
    ]

    rs = status(replica)
    assert rs["role"] == "replica"
    assert rs["node"]["id"] == node_id(replica)
    assert rs["node"]["hostname"] == "replica"
    assert rs["primary"] == me
    assert rs["cluster_id"] == st["cluster_id"]
    assert rs["replicas"] == []
    assert rs["replication"]["connected"] and rs["replication"]["ready"]
    for d in rs["databases"]:
        assert (d["txid"], d["checksum"]) == next(
            (p["txid"], p["checksum"]) for p in st["databases"] if p["name"] == d["name"]
        )
        # WAL is in the database header; the rollback modes differ only in the journal
        # file the writer leaves behind, and a replica has none.
        assert d["journal_mode"] == ("wal" if MODES[d["name"]] == "wal" else "delete")
        assert 0 <= d["lag_ms"] < 3000

    # Special files: .primary only on a connected replica; .lag everywhere.
    assert (replica.mnt / ".primary").read_text() == "primary\n"
    assert not (primary.mnt / ".primary").exists()
    assert ".primary" not in os.listdir(primary.mnt)
    assert ".primary" in os.listdir(replica.mnt)
    assert (primary.mnt / ".lag").read_text() == "+000000000\n"
    assert 0 <= lag(replica) < 2500  # heartbeats every second

    primary.stop()
    wait_for(lambda: not (replica.mnt / ".primary").exists(), 10, what=".primary to go away")
    time.sleep(1.5)
    assert lag(replica) > 1200
    rs = status(replica)
    assert rs["primary"] is None
    assert not rs["replication"]["connected"]
    assert rs["databases"][0]["lag_ms"] > 1200


def test_status_table_default_url_and_unreachable(node_factory, tmp_path: Path) -> None:
    node = node_factory("primary").start()
    conn = connect(node.db("app.db"), "wal")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    # No --url: taken from fuse.yml in the current directory.
    out = cli("status", cwd=node.root)
    assert out.returncode == 0, out.stderr
    assert "role:     primary" in out.stdout
    assert re.search(r"^app\.db\s+0{15}2\s+[0-9a-f]{16}\s+wal\s+8192\s+0$", out.stdout, re.M)
    assert "no replicas connected" in out.stdout

    port = free_port()
    out = cli("status", "--url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"litefspy: cannot reach litefspy node at http://127.0.0.1:{port}")

    out = cli("status", "--url", "ftp://x")
    assert out.returncode == 1
    assert "unsupported URL scheme" in out.stderr


def test_default_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    if not Path("/etc/fuse.yml").exists():
        assert default_url() == FALLBACK_URL
    (tmp_path / "fuse.yml").write_text(
        "fuse: {dir: /tmp/m}\ndata: {dir: /tmp/d}\ngrpc: {addr: ':30303'}\nlease: {type: static}\n"
    )
    assert default_url() == "http://localhost:30303"


def test_status_answers_as_soon_as_the_mount_is_there(node_factory) -> None:
    """The gRPC server listens before the mount appears: no window where apps can use
    the mount but `litefspy status` (or a replica) cannot reach the node."""
    primary: NodeProcess = node_factory("primary").start()  # returns once .lag exists
    res = cli("status", "--json", "--url", primary.url)
    assert res.returncode == 0, res.stderr
    replica: NodeProcess = replica_of(node_factory, primary).start()
    res = cli("status", "--json", "--url", replica.url)
    assert res.returncode == 0, res.stderr


def test_replica_status_dates_its_last_replication_error(node_factory) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica: NodeProcess = replica_of(node_factory, primary).start()
    wait_for((replica.mnt / ".primary").exists, 30, what="the replica to connect")
    primary.stop()
    wait_for(
        lambda: status(replica)["replication"]["last_error"] is not None,
        30,
        what="the replica to record the lost stream",
    )
    repl = status(replica)["replication"]
    assert isinstance(repl["last_error_age_ms"], int) and 0 <= repl["last_error_age_ms"] < 60_000
    assert repl["last_error_healed"] is False
    res = cli("status", "--url", replica.url)
    assert re.search(r"last error \d+ s ago: ", res.stdout), res.stdout
    # Once the replica is connected again, the error is shown as past, not current.
    primary.start()
    wait_for(lambda: status(replica)["replication"]["last_error_healed"], 30, what="the reconnect")
    res = cli("status", "--url", replica.url)
    assert re.search(r"no error since connecting \(the last one, \d+ s ago: ", res.stdout)
    assert not re.search(r"; last error \d+ s ago", res.stdout), res.stdout
