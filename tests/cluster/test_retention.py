"""Retention: old LTX files go, the newest stays; a replica away longer gets a snapshot."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from litefspy.store.store import Store
from tests.support.cluster import replica_of, status, wait_same_pos
from tests.support.nodes import NodeProcess


def test_enforce_retention_keeps_newest(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    db = store.create("app.db")
    names = []
    for txid in range(1, 6):
        path = db.ltx_path(txid, txid)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 3600 + txid, time.time() - 3600 + txid))
        names.append(path.name)
    fresh = db.ltx_path(6, 6)
    fresh.write_bytes(b"y")
    assert store.enforce_retention(600) == 5
    assert [p.name for _, _, p in db.ltx_files()] == [fresh.name]
    # Only old files go, and never the newest even when it is old.
    os.utime(fresh, (time.time() - 7200, time.time() - 7200))
    assert store.enforce_retention(600) == 0
    assert db.ltx_files()[-1][2] == fresh


def test_replica_away_past_retention_gets_a_snapshot(node_factory) -> None:
    primary: NodeProcess = node_factory("primary")
    # Retention is a data.* key: extend the primary's data section.
    text = primary.config_path.read_text().replace(
        f"data:\n  dir: {primary.data}\n",
        f"data:\n  dir: {primary.data}\n  retention: 1s\n  retention-monitor-interval: 200ms\n",
    )
    primary.config_path.write_text(text)
    primary.start()
    replica = replica_of(node_factory, primary).start()
    conn = sqlite3.connect(primary.db("app.db"), isolation_level=None)
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    for i in range(5):
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"a{i}",))
    wait_same_pos(primary, [replica], "app.db")
    replica.stop()
    for i in range(20):
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"b{i}",))
    time.sleep(2.0)  # past retention: the files the replica needs are gone
    assert len(primary.ltx_files("app.db")) < 20
    replica.start()
    wait_same_pos(primary, [replica], "app.db")
    check = sqlite3.connect(replica.db("app.db"))
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 25
    check.close()
    replicas = status(primary)["replicas"]
    assert replicas and replicas[0]["snapshots_sent"] >= 1
    conn.close()
