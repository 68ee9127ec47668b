"""Replication between real node processes: a primary and replicas on loopback.

Every test uses real SQLite through real FUSE mounts on both sides and checks
what a user sees: positions (`NAME-pos`), database contents, integrity, and
that readers on a replica only ever see committed states.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cluster import (
    MODES,
    connect,
    dump,
    integrity,
    replica_lease,
    replica_of,
    status,
    try_pos,
    wait_same_pos,
)
from tests.support.nodes import NodeProcess, wait_for

SCHEMA = """
BEGIN;
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (i INTEGER PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 1), s INTEGER, c INTEGER);
INSERT OR IGNORE INTO counter VALUES (1, 0);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
COMMIT;
"""


def write_txn(
    conn: sqlite3.Connection, n: int, rows: int = 1, size: int = 100, delete: str = ""
) -> None:
    """One transaction: `rows` items, the counter to `n`, totals kept consistent."""
    conn.execute("BEGIN IMMEDIATE")
    if delete:
        conn.execute(f"DELETE FROM items WHERE {delete}")
    for _ in range(rows):
        conn.execute("INSERT INTO items (v) VALUES (randomblob(?))", (size,))
    conn.execute("UPDATE counter SET n = ?", (n,))
    conn.execute(
        "UPDATE totals SET s = (SELECT coalesce(sum(length(v)), 0) FROM items), "
        "c = (SELECT count(*) FROM items)"
    )
    conn.execute("COMMIT")


class ConsistentReader:
    """Reads a replica's database in a loop; records any state no commit produced.

    One long-lived connection (as an application keeps) and, every tenth read, a
    fresh one. Each must only see committed states: the counter never goes back
    (no read sees less than any earlier read, on either connection), and the
    totals row always matches the items.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []
        self.reads = 0
        self.max_seen = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConsistentReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _check(self, conn: sqlite3.Connection, kind: str) -> None:
        conn.execute("BEGIN")
        try:
            n = conn.execute("SELECT n FROM counter").fetchone()[0]
            s, c = conn.execute("SELECT s, c FROM totals").fetchone()
            real = conn.execute("SELECT coalesce(sum(length(v)), 0), count(*) FROM items")
            rs, rc = real.fetchone()
        finally:
            conn.execute("COMMIT")
        # A read transaction never sees less than any read that finished before it.
        floor = self.max_seen
        if n < floor:
            self.errors.append(f"{kind} read went back from {floor} to {n}")
        self.max_seen = max(self.max_seen, n)
        if (s, c) != (rs, rc):
            self.errors.append(f"totals {(s, c)} != items {(rs, rc)} at counter {n}")
        self.reads += 1

    def _run(self) -> None:
        persistent: sqlite3.Connection | None = None
        while not self._stop.is_set():
            try:
                if persistent is None:
                    persistent = sqlite3.connect(self.path, isolation_level=None, timeout=30)
                    persistent.execute("PRAGMA busy_timeout=30000")
                self._check(persistent, "persistent")
                if self.reads % 10 == 0:
                    fresh = sqlite3.connect(self.path, isolation_level=None, timeout=30)
                    fresh.execute("PRAGMA busy_timeout=30000")
                    try:
                        self._check(fresh, "fresh")
                    finally:
                        fresh.close()
            except sqlite3.OperationalError as exc:
                # Before the first file arrives the database (or its tables) may not exist.
                if self.max_seen >= 0:
                    self.errors.append(f"read failed after counter {self.max_seen}: {exc}")
                if persistent is not None:
                    persistent.close()
                    persistent = None
                time.sleep(0.01)
            except Exception as exc:
                self.errors.append(f"read failed: {exc!r}")
                time.sleep(0.01)
        if persistent is not None:
            persistent.close()


def checkpointed_bytes(node: NodeProcess, name: str) -> bytes:
    """The primary's database file after checkpointing any WAL into it."""
    conn = sqlite3.connect(node.db(name), isolation_level=None, timeout=30)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            assert busy == 0
    finally:
        conn.close()
    return node.db(name).read_bytes()


def assert_same_database(primary: NodeProcess, replica: NodeProcess, name: str) -> None:
    """Same position, byte-identical logical database, integrity ok on the replica."""
    pos = wait_same_pos(primary, [replica], name)
    expected = checkpointed_bytes(primary, name)
    # Checkpointing is no transaction: the position must not have moved.
    assert primary.pos(name) == pos
    assert replica.db(name).read_bytes() == expected
    assert integrity(replica, name) == "ok"


def start_pair(node_factory: Callable[..., NodeProcess]) -> tuple[NodeProcess, NodeProcess]:
    primary = node_factory("primary").start()
    replica = replica_of(node_factory, primary, "replica").start()
    return primary, replica


@pytest.mark.parametrize("mode", MODES)
def test_every_transaction_reaches_the_replica(node_factory, mode: str) -> None:
    primary, replica = start_pair(node_factory)
    conn = connect(primary.db("app.db"), mode, cache_size=20)
    conn.executescript(SCHEMA)
    with ConsistentReader(replica.db("app.db")) as reader:
        for n in range(1, 61):
            # Mostly small transactions; some spill pages to the database before commit.
            big = n % 15 == 0
            write_txn(conn, n, rows=200 if big else 1, size=2000 if big else 100)
        write_txn(conn, 61, rows=0, delete="i % 3 = 0")
        if mode != "wal":
            conn.execute("VACUUM")
        write_txn(conn, 62)
        wait_same_pos(primary, [replica], "app.db")
        wait_for(lambda: reader.max_seen == 62, 20, what="reader to see the last commit")
    assert reader.errors == []
    assert reader.reads > 20
    conn.close()
    assert_same_database(primary, replica, "app.db")
    assert dump(replica, "app.db") == dump(primary, "app.db")

    # Writes on the replica fail with SQLite's own read-only error, and change nothing.
    before = replica.pos("app.db")
    rconn = sqlite3.connect(replica.db("app.db"), isolation_level=None, timeout=5)
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):
        rconn.execute("INSERT INTO items (v) VALUES (x'00')")
    with pytest.raises(sqlite3.OperationalError, match="readonly database"):
        rconn.execute("CREATE TABLE nope (x)")
    assert rconn.execute("SELECT n FROM counter").fetchone()[0] == 62
    rconn.close()
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|unable to open"):
        new = sqlite3.connect(replica.db("new.db"), isolation_level=None)
        try:
            new.execute("CREATE TABLE t (x)")
        finally:
            new.close()
    assert not replica.db("new.db").exists()
    assert replica.pos("app.db") == before


def test_wal_reader_connection_sees_new_commits(node_factory) -> None:
    primary, replica = start_pair(node_factory)
    conn = connect(primary.db("app.db"), "wal")
    conn.executescript(SCHEMA)
    wait_same_pos(primary, [replica], "app.db")
    long_lived = sqlite3.connect(replica.db("app.db"), isolation_level=None)
    assert long_lived.execute("SELECT n FROM counter").fetchone()[0] == 0
    for n in (1, 2):
        write_txn(conn, n)
        wait_same_pos(primary, [replica], "app.db")
        fresh = sqlite3.connect(replica.db("app.db"), isolation_level=None)
        assert fresh.execute("SELECT n FROM counter").fetchone()[0] == n
        fresh.close()
        assert long_lived.execute("SELECT n FROM counter").fetchone()[0] == n
    long_lived.close()
    conn.close()


def test_replica_restart_catches_up_incrementally(node_factory) -> None:
    primary, replica = start_pair(node_factory)
    conn = connect(primary.db("app.db"), "wal")
    conn.executescript(SCHEMA)
    for n in range(1, 11):
        write_txn(conn, n)
    wait_same_pos(primary, [replica], "app.db")
    replica.stop()
    for n in range(11, 41):
        write_txn(conn, n)
    replica.start()
    assert_same_database(primary, replica, "app.db")
    replicas = status(primary)["replicas"]
    assert len(replicas) == 1
    assert replicas[0]["snapshots_sent"] == 0
    assert replicas[0]["files_sent"] == 30
    rstat = status(replica)["replication"]
    assert rstat["files_applied"] == 30
    assert rstat["snapshots_applied"] == 0
    assert "sending snapshot" not in primary.log()
    conn.close()


def test_divergent_replica_gets_a_snapshot_and_converges(node_factory) -> None:
    primary, replica = start_pair(node_factory)
    conn = connect(primary.db("app.db"), "delete")
    conn.executescript(SCHEMA)
    for n in range(1, 6):
        write_txn(conn, n)
    wait_same_pos(primary, [replica], "app.db")
    replica.stop()

    # The replica's node runs on its own as a primary for a while: its history diverges
    # (and it gets ahead of the real primary).
    rogue = node_factory("replica")
    rogue.start()
    rconn = connect(rogue.db("app.db"))
    for n in range(100, 110):
        write_txn(rconn, n)
    rconn.close()
    diverged = rogue.pos("app.db")
    rogue.stop()
    assert diverged[0] > primary.pos("app.db")[0]

    for n in range(6, 8):
        write_txn(conn, n)
    back = node_factory("replica", lease=replica_lease(primary, "replica")).start()
    assert_same_database(primary, back, "app.db")
    assert status(primary)["replicas"][0]["snapshots_sent"] == 1
    assert 'reason="replica history differs"' in primary.log()
    # The replica's own history is kept aside, not dropped.
    [aside] = (back.data / "dbs" / "app.db").glob("aside-*")
    assert len(list(aside.glob("*.ltx"))) >= 10
    # It keeps following incrementally afterwards.
    write_txn(conn, 8)
    assert_same_database(primary, back, "app.db")
    assert status(primary)["replicas"][0]["snapshots_sent"] == 1
    conn.close()


def test_primary_restart_replicas_reconnect_and_continue(node_factory) -> None:
    primary, replica = start_pair(node_factory)
    conn = connect(primary.db("app.db"), "wal")
    conn.executescript(SCHEMA)
    write_txn(conn, 1)
    wait_same_pos(primary, [replica], "app.db")
    assert (replica.mnt / ".primary").read_text() == "primary\n"
    conn.close()
    primary.stop()
    wait_for(lambda: not (replica.mnt / ".primary").exists(), 10, what=".primary to go away")
    # Reads keep working on the replica while the primary is away.
    rconn = sqlite3.connect(replica.db("app.db"))
    assert rconn.execute("SELECT n FROM counter").fetchone()[0] == 1
    rconn.close()
    primary.start()
    conn = connect(primary.db("app.db"))
    for n in range(2, 12):
        write_txn(conn, n)
    conn.close()
    assert_same_database(primary, replica, "app.db")
    assert (replica.mnt / ".primary").read_text() == "primary\n"
    assert status(replica)["replication"]["snapshots_applied"] == 0


def test_new_and_deleted_databases_propagate(node_factory) -> None:
    primary, replica = start_pair(node_factory)
    for name, mode in (("a.db", "delete"), ("b.db", "truncate")):
        c = connect(primary.db(name), mode)
        c.execute("CREATE TABLE t (x)")
        c.execute("INSERT INTO t VALUES (1)")
        c.close()
        wait_same_pos(primary, [replica], name)
        assert dump(replica, name) == dump(primary, name)
    primary.db("a.db").unlink()
    wait_for(lambda: not replica.db("a.db").exists(), 20, what="a.db to be deleted on the replica")
    assert replica.db("b.db").exists()
    # A database recreated under the same name arrives again.
    c = connect(primary.db("a.db"), "wal")
    c.execute("CREATE TABLE again (y)")
    c.execute("INSERT INTO again VALUES (2)")
    c.close()
    wait_same_pos(primary, [replica], "a.db")
    assert dump(replica, "a.db") == dump(primary, "a.db")


def test_replica_keeps_databases_the_primary_does_not_have(node_factory) -> None:
    primary = node_factory("primary").start()
    # A node that was a primary on its own first: it has a database of its own.
    solo = node_factory("replica").start()
    c = connect(solo.db("mine.db"), "delete")
    c.execute("CREATE TABLE t (x)")
    c.execute("INSERT INTO t VALUES (42)")
    c.close()
    mine = solo.pos("mine.db")
    solo.stop()
    # Replicating refuses: it already belongs to its own cluster.
    replica = node_factory("replica", lease=replica_lease(primary, "replica")).start()
    wait_for(lambda: "cluster id mismatch" in replica.log(), 20, what="cluster id refusal")
    assert "replica from another cluster refused" in primary.log()
    replica.stop()
    # Once it adopts the primary's cluster (clusterid removed), it replicates, and
    # its own database is left alone.
    (replica.data / "clusterid").unlink()
    replica = node_factory("replica", lease=replica_lease(primary, "replica")).start()
    c = connect(primary.db("app.db"), "wal")
    c.execute("CREATE TABLE t (x)")
    c.close()
    wait_same_pos(primary, [replica], "app.db")
    assert replica.pos("mine.db") == mine
    assert dump(replica, "mine.db")[-2:] == ['INSERT INTO "t" VALUES(42);', "COMMIT;"]


def _writer(path: Path, mode: str, count: int, errors: list[str]) -> None:
    try:
        conn = connect(path, mode)
        conn.executescript(SCHEMA)
        for n in range(1, count + 1):
            write_txn(conn, n, rows=1 + n % 4)
        conn.close()
    except Exception as exc:
        errors.append(f"{path.name}: {exc!r}")


def test_three_nodes_four_databases(node_factory) -> None:
    primary = node_factory("primary").start()
    replicas = [replica_of(node_factory, primary, f"replica{i}").start() for i in (1, 2)]
    names = [f"db{i}-{mode}.db" for i, mode in enumerate(MODES)]
    errors: list[str] = []
    writers = [
        threading.Thread(target=_writer, args=(primary.db(name), mode, 40, errors))
        for name, mode in zip(names, MODES, strict=True)
    ]
    with (
        ConsistentReader(replicas[0].db(names[0])) as r1,
        ConsistentReader(replicas[1].db(names[3])) as r2,
    ):
        for t in writers:
            t.start()
        for t in writers:
            t.join(120)
        assert errors == []
        for name in names:
            wait_same_pos(primary, replicas, name, timeout=60)
        wait_for(lambda: r1.max_seen == 40 and r2.max_seen == 40, 20, what="readers")
    assert r1.errors == [] and r2.errors == []
    for name in names:
        expected = checkpointed_bytes(primary, name)
        for r in replicas:
            assert r.db(name).read_bytes() == expected, f"{name} differs on {r.name}"
            assert integrity(r, name) == "ok"
    st = status(primary)
    assert sorted(r["hostname"] for r in st["replicas"]) == ["replica1", "replica2"]
    for r in st["replicas"]:
        got = {d["name"]: d["txid"] for d in r["databases"]}
        assert got == {name: f"{primary.pos(name)[0]:016x}" for name in names}
    for r in replicas:
        assert {d["name"] for d in status(r)["databases"]} == set(names)
        assert try_pos(r, names[0]) == primary.pos(names[0])


def test_mount_command_on_a_replica_starts_once_caught_up(node_factory) -> None:
    primary = node_factory("primary").start()
    conn = connect(primary.db("app.db"), "wal")
    conn.executescript(SCHEMA)
    for n in range(1, 21):
        write_txn(conn, n)
    conn.close()
    replica = replica_of(node_factory, primary, "replica")
    script = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "n = c.execute('SELECT n FROM counter').fetchone()[0]; print('counter', n); "
        "sys.exit(3)"
    )
    mount = [sys.executable, "-m", "litefspy", "mount", "-c", str(replica.config_path)]
    out = subprocess.run(
        [*mount, "--", sys.executable, "-c", script, str(replica.db("app.db"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 3, out.stderr[-3000:]
    assert out.stdout == "counter 20\n"
    assert "waiting to catch up with the primary" in out.stderr
