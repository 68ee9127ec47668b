"""Startup recovery never discards, undoes or refuses data SQLite committed.

Each case was reproduced against the previous recovery: a rolled-back
transaction that reused free-list pages took a sound database offline, and a
truncated or deleted newest LTX file on a stopped primary silently undid the
last acknowledged transaction (and a replica was then overwritten to match).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from tests.support.cluster import MODES, connect, dump, integrity, replica_of, wait_same_pos
from tests.support.nodes import NodeProcess, wait_for

RECAPTURED = "its state is recorded as the next transaction; nothing was lost"

# Fills the database, frees most of it, then, in a transaction that spills
# pages to the database file before COMMIT (tiny cache), reuses those free-list
# pages: SQLite does not journal free-list leaves it reuses. Prints "spilled"
# and waits, transaction open, for the test to kill litefspy.
SPILLER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("PRAGMA journal_mode=delete")
conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
conn.execute("BEGIN")
for i in range(1, 401):
    conn.execute("INSERT INTO t VALUES (?, randomblob(3000))", (i,))
conn.execute("COMMIT")
conn.execute("DELETE FROM t WHERE i > 20")
print("committed", flush=True)
conn.execute("PRAGMA cache_size=2")
conn.execute("BEGIN")
for i in range(1000, 1300):
    conn.execute("INSERT INTO t VALUES (?, randomblob(3000))", (i,))
print("spilled", flush=True)
time.sleep(600)
"""


def test_rolled_back_transaction_that_reused_free_pages_stays_online(node_factory) -> None:
    primary: NodeProcess = node_factory("primary").start()
    app = subprocess.Popen(
        [sys.executable, "-c", SPILLER, str(primary.db("app.db"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "committed"
        assert app.stdout.readline().strip() == "spilled"
        hot = primary.data / "dbs" / "app.db" / "journal"
        assert hot.exists() and hot.stat().st_size > 0, "the transaction must be in flight"
        primary.kill()
    finally:
        app.kill()
        app.communicate()
    primary.start()
    # Online, with exactly what was committed, and sound.
    conn = connect(primary.db("app.db"))
    rows = conn.execute("SELECT count(*), max(i) FROM t").fetchone()
    conn.close()
    assert rows == (20, 20)
    assert integrity(primary, "app.db") == "ok"
    log = primary.log()
    assert "database offline" not in log
    assert RECAPTURED in log, "the free-list pages must have made the file differ"
    # The recorded state is history like any other: a new replica gets it, and
    # the primary goes on committing on top of it.
    replica = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"))
    conn.execute("INSERT INTO t VALUES (21, x'00')")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")
    assert dump(replica, "app.db") == dump(primary, "app.db")


def _rows(node: NodeProcess) -> list[int]:
    conn = sqlite3.connect(node.db("app.db"), timeout=30)
    try:
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY x")]
    finally:
        conn.close()


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
@pytest.mark.parametrize("mode", MODES)
def test_lost_newest_ltx_file_never_undoes_the_commit(node_factory, mode: str, damage: str) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"), mode)
    conn.execute("CREATE TABLE t (x)")
    for x in (1, 2, 3):
        conn.execute("INSERT INTO t VALUES (?)", (x,))
    conn.close()
    before = wait_same_pos(primary, [replica], "app.db")
    primary.stop()
    newest = primary.ltx_files("app.db")[-1]
    if damage == "truncated":
        with open(newest, "r+b") as f:
            f.truncate(newest.stat().st_size // 2)
    else:
        newest.unlink()
    primary.start()
    assert _rows(primary) == [1, 2, 3]
    assert integrity(primary, "app.db") == "ok"
    log = primary.log()
    assert "database offline" not in log
    assert "never synced" not in log
    assert RECAPTURED in log
    # Same TXID as before; the state is the one the replica already has, so it
    # keeps it (no snapshot over it) and both go on together.
    assert primary.pos("app.db") == before
    conn = connect(primary.db("app.db"))
    conn.execute("INSERT INTO t VALUES (4)")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")
    assert _rows(replica) == [1, 2, 3, 4]
    assert "set aside" not in replica.log()


def test_torn_newest_file_whose_transaction_never_reached_the_database(
    node_factory,
) -> None:
    """The other side: when SQLite's files do not have it either, the loss is reported."""
    primary: NodeProcess = node_factory("primary").start()
    conn = connect(primary.db("app.db"), "delete")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    saved = (primary.data / "dbs" / "app.db" / "database").read_bytes()
    conn = connect(primary.db("app.db"))
    conn.execute("INSERT INTO t VALUES (2)")
    conn.close()
    primary.stop()
    # As a power loss can leave it: the database file without the last commit,
    # its LTX file cut short.
    (primary.data / "dbs" / "app.db" / "database").write_bytes(saved)
    newest = primary.ltx_files("app.db")[-1]
    with open(newest, "r+b") as f:
        f.truncate(100)
    primary.start()
    assert _rows(primary) == [1]
    wait_for(lambda: "transactions lost" in primary.log(), 5, what="the loss reported")
    assert f"txids={int(newest.name[:16], 16):x}" in primary.log()
