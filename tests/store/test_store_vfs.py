"""Capture and recovery with real SQLite and no mount (tests/store_vfs.py's VFS).

The LTX history a store records must replay into exactly the database SQLite
wrote, in every journal mode; and after a kill -9 at any moment, recovery must
leave a database whose history still replays into it, holding every commit
SQLite acknowledged and nothing of an unfinished transaction.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from litefspy.ltx.apply import apply_files
from litefspy.ltx.checksum import checksum_database_file
from litefspy.store.store import Store
from tests.support.store_vfs import BLOBS, StoreVFS, dump

MODES = ["delete", "truncate", "persist", "wal"]
ROOT = Path(__file__).resolve().parents[2]


def _replay(store: Store, name: str, out: Path) -> None:
    """Apply the database's whole LTX history to an empty file at `out`."""
    db = store.get(name)
    assert db is not None
    apply_files(out, [path for _, _, path in db.ltx_files()])


def _checksum(path: Path, page_size: int) -> int:
    """LTX's checksum of a whole database file (what a position's checksum names)."""
    with open(path, "rb") as f:
        return checksum_database_file(f, page_size)


@pytest.mark.parametrize("mode", MODES)
def test_history_replays_into_what_sqlite_wrote(tmp_path: Path, mode: str) -> None:
    store = Store(tmp_path / "data")
    store.open()
    vfs = StoreVFS(store, f"store-{mode}")
    conn = vfs.connect("app.db")
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("PRAGMA cache_size=8")  # a big transaction spills pages before its commit
    conn.execute("CREATE TABLE t (n INTEGER, b BLOB)")
    for i in range(1, 21):
        conn.execute("INSERT INTO t (n) VALUES (?)", (i,))
    conn.execute("BEGIN")
    conn.execute(BLOBS.format(n=200, size=3000))
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM t WHERE n > 0")
    conn.execute(BLOBS.format(n=100, size=5000))
    conn.execute("ROLLBACK")  # nothing of it may reach the history
    conn.execute("DELETE FROM t WHERE n < -100")
    conn.execute("VACUUM")
    if mode == "wal":
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()

    db = store.get("app.db")
    assert db is not None and db.checksums is not None
    files = db.ltx_files()
    assert [lo for lo, _, _ in files] == [hi + 1 for _, hi, _ in [(0, 0, None), *files[:-1]]]
    assert db.pos.txid == files[-1][1]
    replayed = tmp_path / "replayed.db"
    _replay(store, "app.db", replayed)
    page_size = db.checksums.page_size
    assert _checksum(replayed, page_size) == db.pos.checksum == db.checksums.total
    assert _checksum(db.db_path, page_size) == db.pos.checksum
    assert dump(replayed) == dump(db.db_path)
    rows = dump(replayed)
    assert sum(line.startswith('INSERT INTO "t"') for line in rows) == 20 + 100
    store.close()


WRITER = r"""
import sys, time
from pathlib import Path
from litefspy.store.store import Store
from tests.support.store_vfs import BLOBS, StoreVFS, dump

data, mode = Path(sys.argv[1]), sys.argv[2]
store = Store(data)
store.open()
conn = StoreVFS(store).connect("app.db")
conn.execute(f"PRAGMA journal_mode={mode}")
conn.execute("PRAGMA cache_size=8")
conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER, b BLOB)")
n = conn.execute("SELECT count(*) FROM t").fetchone()[0]
while True:
    n += 1
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t (n, b) VALUES (?, randomblob(?))", (n, 200 + (n % 7) * 3000))
    if n % 5 == 0:  # every fifth transaction spills: the database changes before its commit
        conn.execute(
            "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 60) "
            "INSERT INTO t (n, b) SELECT -x, randomblob(4000) FROM s"
        )
        conn.execute("DELETE FROM t WHERE n < 0")
    conn.execute("COMMIT")
    print(n, flush=True)  # acknowledged
"""


CONTENT = "SELECT rowid, n, hex(b) FROM t ORDER BY rowid"


def _kill_writer_at_random(data: Path, mode: str, seconds: float) -> int:
    """Run the writer, kill -9 it after `seconds`; the last commit it acknowledged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data), mode],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.strip().isdigit(), f"writer did not start: {first!r}"
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return int(([first, *out.split()])[-1])


@pytest.mark.parametrize("mode", MODES)
def test_recovery_after_kill_keeps_every_acknowledged_commit(tmp_path: Path, mode: str) -> None:
    data = tmp_path / "data"
    rng = random.Random(mode)
    for round_ in range(3):
        acknowledged = _kill_writer_at_random(data, mode, rng.uniform(0.05, 0.4))
        store = Store(data)
        store.open()  # recovery
        db = store.get("app.db")
        assert db is not None and db.checksums is not None
        vfs = StoreVFS(store, f"recovered-{mode}-{round_}")
        conn = vfs.connect("app.db")
        count, top = conn.execute("SELECT count(*), max(n) FROM t").fetchone()
        negatives = conn.execute("SELECT count(*) FROM t WHERE n < 0").fetchone()[0]
        rows = conn.execute(CONTENT).fetchall()
        conn.close()
        # Every acknowledged commit, at most the one in flight, never a torn one.
        assert top in (acknowledged, acknowledged + 1), (top, acknowledged)
        assert count == top and negatives == 0
        replayed = tmp_path / f"replayed-{round_}.db"
        _replay(store, "app.db", replayed)
        assert _checksum(replayed, db.checksums.page_size) == db.pos.checksum
        check = sqlite3.connect(replayed)
        assert check.execute(CONTENT).fetchall() == [tuple(row) for row in rows]
        check.close()
        store.close()
        replayed.unlink()
