"""A full disk: SQLite gets a clean error, nothing committed is lost, writes resume.

The store and its mount run in this process (SQLite calls in worker threads), with
the data directory on a tiny tmpfs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.store.store import Store
from tests.support.disk import small_tmpfs

MODES = ["delete", "truncate", "persist", "wal"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs for the node's data directory (root only)."""
    with small_tmpfs(tmp_path / "small", "6m") as mnt:
        yield mnt


def _fill(db: Path, mode: str) -> tuple[int, str]:
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
    committed = 0
    try:
        for _ in range(10_000):
            conn.execute("INSERT INTO t (v) VALUES (randomblob(20000))")
            committed += 1
    except sqlite3.OperationalError as exc:
        return committed, str(exc)
    finally:
        conn.close()
    return committed, ""


def _check(db: Path) -> tuple[int, str]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        count = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        return count, conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _shrink(db: Path, mode: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("DELETE FROM t WHERE i = 1")
    conn.close()


@pytest.mark.parametrize("mode", MODES)
async def test_full_disk_refuses_cleanly_and_recovers(
    small_disk: Path, tmp_path: Path, mode: str
) -> None:
    # Ballast the operator can delete to make room once the disk is full.
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (2 << 20))
    store = Store(small_disk / "data", compress=False)
    store.open()
    ops = Operations(store)
    mnt = tmp_path / "mnt"
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(ops, mnt, task_status=task_status))
        committed, error = await trio.to_thread.run_sync(_fill, mnt / "app.db", mode)
        assert committed > 10
        assert any(word in error for word in ("full", "disk", "I/O")), error
        # Every acknowledged row is there and the database is intact.
        count, check = await trio.to_thread.run_sync(_check, mnt / "app.db")
        assert (count, check) == (committed, "ok")
        # The operator makes room; writes go on from the last committed state.
        ballast.unlink()
        await trio.to_thread.run_sync(_shrink, mnt / "app.db", mode)
        count, check = await trio.to_thread.run_sync(_check, mnt / "app.db")
        assert (count, check) == (committed - 1, "ok")
        nursery.cancel_scope.cancel()
    store.close()
    # A restart recovers to the same position.
    pos = store.get("app.db").pos  # type: ignore[union-attr]
    again = Store(small_disk / "data")
    again.open()
    assert again.get("app.db").pos == pos  # type: ignore[union-attr]
    assert not again.failed
    again.close()
