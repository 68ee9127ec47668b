"""Single node: every committed transaction through a real mount becomes a verified LTX file.

Real SQLite (stdlib sqlite3 and the sqlite3 CLI) through a real FUSE mount, in every
journal mode and several page sizes.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from litefspy.ltx.apply import apply_files
from litefspy.ltx.decoder import verify_file
from tests.support.nodes import NodeProcess

MODES = ["delete", "truncate", "persist", "wal"]


def connect(path: Path, mode: str, page_size: int = 4096, **pragmas: object) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute(f"PRAGMA journal_mode={mode}")
    for key, value in pragmas.items():
        conn.execute(f"PRAGMA {key}={value}")
    return conn


def replay(node: NodeProcess, name: str, out: Path) -> tuple[int, int]:
    """Apply every LTX file of `name` from TXID 1 to a fresh path."""
    files = node.ltx_files(name)
    assert files, "no LTX files"
    return apply_files(out, files)


def logical_bytes(node: NodeProcess, name: str, mode: str) -> bytes:
    """The mounted database's bytes, with WAL content checkpointed first."""
    if mode == "wal":
        conn = sqlite3.connect(node.db(name), isolation_level=None)
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        conn.close()
        assert busy == 0
    return node.db(name).read_bytes()


def assert_reproduces(node: NodeProcess, name: str, mode: str, tmp_path: Path) -> None:
    out = tmp_path / f"replay-{name}"
    out.unlink(missing_ok=True)
    txid, checksum = replay(node, name, out)
    assert (txid, checksum) == node.pos(name)
    assert out.read_bytes() == logical_bytes(node, name, mode)
    check = sqlite3.connect(out)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
@pytest.mark.parametrize("mode", MODES)
def test_every_commit_is_one_contiguous_ltx(
    node: NodeProcess, tmp_path: Path, mode: str, page_size: int
) -> None:
    conn = connect(node.db("app.db"), mode, page_size)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    start_txid, _ = node.pos("app.db")
    assert start_txid >= 1
    n = 25
    for i in range(n):
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i} " * (i % 7 + 1),))
    txid, _ = node.pos("app.db")
    assert txid == start_txid + n
    files = node.ltx_files("app.db")
    assert [f.name for f in files] == [f"{i:016x}-{i:016x}.ltx" for i in range(1, txid + 1)]
    for f in files:
        verify_file(f)
    conn.close()
    assert_reproduces(node, "app.db", mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_empty_and_rolled_back_transactions_create_no_txid(
    node: NodeProcess, tmp_path: Path, mode: str
) -> None:
    conn = connect(node.db("app.db"), mode)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("INSERT INTO t (v) VALUES (randomblob(3000))")
    before = node.pos("app.db")
    content = conn.execute("SELECT v FROM t").fetchall()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("COMMIT")
    assert node.pos("app.db") == before
    conn.execute("BEGIN")
    for _ in range(50):
        conn.execute("INSERT INTO t (v) VALUES (randomblob(3000))")
    conn.execute("UPDATE t SET v = x'00' WHERE id = 1")
    conn.execute("ROLLBACK")
    assert node.pos("app.db") == before
    assert conn.execute("SELECT v FROM t").fetchall() == content
    # A rollback with a tiny cache spills pages to the database before rolling back.
    conn.execute("PRAGMA cache_size=2")
    conn.execute("BEGIN")
    for _ in range(200):
        conn.execute("INSERT INTO t (v) VALUES (randomblob(3000))")
    conn.execute("ROLLBACK")
    assert node.pos("app.db") == before
    assert conn.execute("SELECT v FROM t").fetchall() == content
    conn.close()
    assert_reproduces(node, "app.db", mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_large_spilling_transaction_vacuum_drop_and_shrink(
    node: NodeProcess, tmp_path: Path, mode: str
) -> None:
    conn = connect(node.db("big.db"), mode, cache_size=10)
    conn.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("BEGIN")
    for _ in range(2000):
        conn.execute("INSERT INTO a (v) VALUES (randomblob(500))")
    # Rewrite pages that were already spilled in this transaction.
    conn.execute("UPDATE a SET v = randomblob(400) WHERE id % 3 = 0")
    conn.execute("COMMIT")
    conn.execute("INSERT INTO b (v) SELECT v FROM a")
    conn.execute("DELETE FROM a WHERE id % 2 = 0")
    conn.execute("DROP TABLE b")
    conn.execute("VACUUM")
    assert_reproduces(node, "big.db", mode, tmp_path)
    if mode == "wal":
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("INSERT INTO a (v) VALUES (randomblob(100))")
    conn.execute("PRAGMA integrity_check")
    conn.close()
    assert_reproduces(node, "big.db", mode, tmp_path)


def test_journal_mode_switches(node: NodeProcess, tmp_path: Path) -> None:
    conn = connect(node.db("sw.db"), "delete")
    conn.execute("CREATE TABLE t (v)")
    for mode in ["wal", "delete", "truncate", "wal", "persist", "wal", "delete"]:
        assert conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
        for i in range(3):
            conn.execute("INSERT INTO t VALUES (?)", (f"{mode}{i}",))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 21
    conn.close()
    assert_reproduces(node, "sw.db", "delete", tmp_path)


def test_wal_restart_after_checkpoint_and_exclusive_locking(
    node: NodeProcess, tmp_path: Path
) -> None:
    conn = connect(node.db("w.db"), "wal", wal_autocheckpoint=0)
    conn.execute("CREATE TABLE t (v)")
    for round_ in range(4):
        for i in range(10):
            conn.execute("INSERT INTO t VALUES (?)", (f"{round_}-{i}",))
        # A full checkpoint lets the next writer restart the WAL with new salts.
        conn.execute("PRAGMA wal_checkpoint(RESTART)")
    conn.close()
    ex = connect(node.db("w.db"), "wal", locking_mode="EXCLUSIVE")
    for i in range(5):
        ex.execute("INSERT INTO t VALUES (?)", (f"ex{i}",))
    ex.close()
    conn = sqlite3.connect(node.db("w.db"))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 45
    conn.close()
    assert_reproduces(node, "w.db", "wal", tmp_path)


def test_sqlite3_cli_through_the_mount(node: NodeProcess, tmp_path: Path) -> None:
    script = "PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES(1),(2);"
    subprocess.run(["sqlite3", str(node.db("cli.db")), script], check=True, capture_output=True)
    out = subprocess.run(
        ["sqlite3", str(node.db("cli.db")), "SELECT sum(x) FROM t"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "3"
    assert_reproduces(node, "cli.db", "wal", tmp_path)


WRITER = """
import sqlite3, sys
path, mode, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
conn = sqlite3.connect(path, isolation_level=None, timeout=30)
conn.execute("PRAGMA busy_timeout=30000")
for i in range(n):
    conn.execute("INSERT INTO t (tag, i) VALUES (?, ?)", (tag, i))
print("done", flush=True)
"""


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_two_writer_processes(node: NodeProcess, tmp_path: Path, mode: str) -> None:
    conn = connect(node.db("c.db"), mode)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, tag TEXT, i INT)")
    conn.close()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(node.db("c.db")), mode, tag, "150"])
        for tag in ("a", "b")
    ]
    for p in procs:
        assert p.wait(120) == 0
    conn = sqlite3.connect(node.db("c.db"))
    rows = conn.execute("SELECT tag, count(*) FROM t GROUP BY tag").fetchall()
    assert rows == [("a", 150), ("b", 150)]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert_reproduces(node, "c.db", mode, tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_delete_and_recreate_database(node: NodeProcess, tmp_path: Path, mode: str) -> None:
    conn = connect(node.db("a.db"), mode)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    before = node.pos("a.db")
    node.db("a.db").unlink()
    assert not node.db("a.db").exists()
    conn = connect(node.db("a.db"), mode)
    conn.execute("CREATE TABLE u (y)")
    conn.execute("INSERT INTO u VALUES (2)")
    assert conn.execute("SELECT y FROM u").fetchall() == [(2,)]
    conn.close()
    # History goes on: a deletion (commit 0) then the new database's commits.
    assert node.pos("a.db")[0] > before[0] + 1
    assert_reproduces(node, "a.db", mode, tmp_path)
