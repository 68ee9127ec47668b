"""FUSE requests per commit stay few, and the kernel serves the primary's reads.

Counts of FUSE requests do not depend on how fast the machine is: a single-row
commit through a real mount makes the same requests every time, so they can be
bounded exactly (issue 13, items 4 and 6; `python -m bench --only fusereq`
reports the same counts from a node process). One mount serves every case.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import trio

from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.store.store import Store

COMMITS = 20
# Measured per single-row commit (as root: SQLite then chowns each new journal,
# one setattr). DELETE: 10 writes, 1 read (SQLite reads 8 bytes past the
# journal's end), create/release/unlink of the journal, a negative lookup of
# it, 2 journal fsyncs (1 with NORMAL) and 1 database fsync, SQLite's directory
# sync (fsyncdir), and a getattr each of the database and the journal after
# their writes. No getattr of the root, no opendir/releasedir.
BOUNDS: dict[tuple[str, str], tuple[float, dict[str, float]]] = {
    ("delete", "full"): (22.2, {"getattr": 2, "lookup": 1, "fsync": 3, "write": 10.1}),
    ("delete", "normal"): (21.2, {"getattr": 2, "lookup": 1, "fsync": 2, "write": 10.1}),
    ("wal", "full"): (3.2, {"getattr": 0, "lookup": 0, "fsync": 1, "write": 2.2}),
    ("wal", "normal"): (2.2, {"getattr": 0, "lookup": 0, "fsync": 0, "write": 2.2}),
}


def counted(ops: Operations, work: Callable[[], None]) -> dict[str, int]:
    before = dict(ops.request_counts)
    work()
    return {
        op: n - before.get(op, 0) for op, n in ops.request_counts.items() if n > before.get(op, 0)
    }


def _connect(path: Path, mode: str, sync: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute(f"PRAGMA synchronous={sync}")
    return conn


def commits_are_bounded(ops: Operations, mnt: Path) -> None:
    for (mode, sync), (total, per_op) in BOUNDS.items():
        conn = _connect(mnt / f"{mode}-{sync}.db", mode, sync)
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for _ in range(5):
            conn.execute("INSERT INTO t (v) VALUES ('x')")

        def commit(c: sqlite3.Connection = conn) -> None:
            for _ in range(COMMITS):
                c.execute("INSERT INTO t (v) VALUES ('x')")

        seen = {op: n / COMMITS for op, n in counted(ops, commit).items()}
        conn.close()
        what = f"{mode}/{sync}: {seen}"
        assert sum(seen.values()) <= total, what
        for op, bound in per_op.items():
            assert seen.get(op, 0) <= bound, what
        assert "opendir" not in seen and "releasedir" not in seen, what
        assert seen.get("write", 0) >= 2, what  # the commits did go through the mount


def reads_after_a_commit_hit_the_page_cache(ops: Operations, mnt: Path, data: Path) -> None:
    """DELETE mode: a commit on the primary leaves the kernel's pages in place."""
    ops.mtime_refresh = 4.0  # seconds a new mtime may wait to show (default 60)
    path = mnt / "reads.db"
    writer = _connect(path, "delete", "full")
    writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    writer.execute("BEGIN")
    writer.executemany("INSERT INTO t (v) VALUES (?)", ((f"{i:06d}" * 20,) for i in range(3000)))
    writer.execute("COMMIT")
    rows = 3000

    def point_reads() -> None:
        reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        reader.execute("PRAGMA cache_size=5")  # pages: every read reaches the kernel
        rng = random.Random(3)
        for _ in range(300):
            row = reader.execute("SELECT v FROM t WHERE id = ?", (rng.randint(1, rows),))
            assert row.fetchone() is not None
        reader.close()

    point_reads()  # the kernel caches every page read
    before = os.stat(path).st_mtime_ns
    writer.execute("UPDATE t SET v = 'changed' WHERE id = 7")
    # Past a whole second: the mtime the kernel would compare has moved on.
    time.sleep(1.05)
    seen = counted(ops, point_reads)
    assert seen.get("read", 0) <= 2, seen
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert reader.execute("SELECT v FROM t WHERE id = 7").fetchone() == ("changed",)
    reader.close()
    # The mount showed the mtime as it was, and shows the true one once it is
    # due (what tools comparing mtimes rely on), without anyone closing the file.
    real = os.stat(data / "dbs" / "reads.db" / "database").st_mtime_ns
    assert real != before
    deadline = time.monotonic() + 10
    while os.stat(path).st_mtime_ns != real and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.stat(path).st_mtime_ns == real
    writer.close()


def listing_works_without_opendir(mnt: Path) -> None:
    names = set(os.listdir(mnt))
    assert {"delete-full.db", "wal-full.db", "reads.db", "reads.db-pos", ".lag"} <= names
    assert "reads.db-journal" not in names
    assert "wal-full.db-wal" not in names  # the last connection's close removed it


async def test_requests_per_commit_and_reads_after_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    ops = Operations(store)
    mnt = tmp_path / "mnt"

    def work() -> None:
        commits_are_bounded(ops, mnt)
        reads_after_a_commit_hit_the_page_cache(ops, mnt, tmp_path / "data")
        listing_works_without_opendir(mnt)

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(ops, mnt, task_status=task_status))
        await trio.to_thread.run_sync(work)
        nursery.cancel_scope.cancel()
    store.close()
