"""Replica-side store: applying LTX files under SQLite locks through a real mount.

The replica store runs in this test process (its mount served by the test's trio
loop); the LTX files come from a real primary node process. SQLite work against
the in-process mount runs in worker threads or subprocesses, never on the loop.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from litefspy.errors import ReplicationError
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.ltx.decoder import verify_file
from litefspy.store.store import Store
from tests.support.mounted import attach_store
from tests.support.nodes import NodeProcess

READER = r"""
import sqlite3, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + seconds
last = -1
reads = 0
while time.monotonic() < deadline:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        time.sleep(0.01)
        continue
    try:
        row = conn.execute("SELECT count(*), coalesce(sum(n), 0) FROM t").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            conn.close(); time.sleep(0.01); continue
        raise
    count, total = row
    assert total == count * (count + 1) // 2, (count, total)   # only committed states
    assert count >= last, (count, last)                      # never goes back
    last = count
    reads += 1
    conn.close()
print(reads, last)
"""


WRITE_ATTEMPT = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=5)
try:
    conn.execute("INSERT INTO t VALUES (0)")
    conn.commit()
    print("write succeeded")
except sqlite3.OperationalError as exc:
    print(exc)
"""


def _primary_history(node_factory, rows: int, mode: str = "delete") -> NodeProcess:
    """A primary node whose app.db got `rows` single-row commits of n = 1..rows."""
    primary: NodeProcess = node_factory("primary").start()
    conn = sqlite3.connect(primary.db("app.db"), isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t (n INTEGER)")
    for i in range(1, rows + 1):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.close()
    return primary


async def _mounted_replica(nursery: trio.Nursery, root: Path) -> tuple[Store, Path]:
    store = Store(root / "data")
    store.open()
    store.set_writable(False)
    ops = Operations(store)
    mnt = root / "mnt"
    await nursery.start(lambda task_status: serve(ops, mnt, task_status=task_status))
    await nursery.start(attach_store, store, mnt, ops)
    return store, mnt


async def _apply_all(store: Store, name: str, files: list[Path]) -> None:
    """Apply each file as the replication client does: a file that came in one
    chunk from its bytes (even TXIDs here), a longer one from a received file."""
    for f in files:
        if int(f.name.split("-")[0], 16) % 2 == 0:
            await store.apply_ltx(name, f.read_bytes())
            continue
        incoming = store.incoming_path(name)
        shutil.copyfile(f, incoming)
        await store.apply_ltx(name, incoming)


def _query(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["delete", "truncate", "persist", "wal"])
async def test_replica_applies_under_readers(node_factory, tmp_path: Path, mode: str) -> None:
    primary = _primary_history(node_factory, 119, mode)
    files = primary.ltx_files("app.db")

    async with trio.open_nursery() as nursery:
        store, mnt = await _mounted_replica(nursery, tmp_path / "replica")
        # Apply the first files, then start a reader and apply the rest under it.
        await _apply_all(store, "app.db", files[:10])
        reader = await trio.lowlevel.open_process(
            [sys.executable, "-c", READER, str(mnt / "app.db"), "6"],
            stdout=subprocess.PIPE,
        )
        for f in files[10:]:
            await _apply_all(store, "app.db", [f])
            await trio.sleep(0.02)
        assert await reader.wait() == 0
        out = await reader.stdout.receive_some()  # type: ignore[union-attr]
        reads, last = map(int, out.split())
        assert reads > 10 and last == 119

        assert store.get("app.db").pos.txid == len(files)  # type: ignore[union-attr]
        replica_pos = await trio.to_thread.run_sync((mnt / "app.db-pos").read_text)
        assert replica_pos == (primary.mnt / "app.db-pos").read_text()
        rows = await trio.to_thread.run_sync(
            _query, mnt / "app.db", "SELECT count(*), sum(n) FROM t"
        )
        assert rows == [(119, 119 * 120 // 2)]
        # Every file is kept byte for byte, and each apply finished its syncs.
        db = store.get("app.db")
        assert db is not None and not db.apply_marker.exists()
        kept = sorted(p.name for p in db.ltx_dir.iterdir())
        assert kept == [f.name for f in files]
        assert all((db.ltx_dir / f.name).read_bytes() == f.read_bytes() for f in files)

        # Writes on the replica fail cleanly (from another process: this one is the
        # daemon, whose own opens are allowed to write for locking).
        attempt = await trio.run_process(
            [sys.executable, "-c", WRITE_ATTEMPT, str(mnt / "app.db")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert attempt.returncode == 0, attempt.stderr
        assert b"attempt to write a readonly database" in attempt.stdout

        # A snapshot of the replica's state verifies and matches the position.
        snap = await store.snapshot("app.db")
        header, trailer = verify_file(snap)
        assert (header.min_txid, header.max_txid) == (1, len(files))
        assert trailer.post_apply_checksum == store.get("app.db").pos.checksum  # type: ignore[union-attr]
        snap.unlink()
        nursery.cancel_scope.cancel()


async def test_replica_refuses_gaps_and_corruption(node_factory, tmp_path: Path) -> None:
    primary = _primary_history(node_factory, 5)
    files = primary.ltx_files("app.db")
    async with trio.open_nursery() as nursery:
        store, mnt = await _mounted_replica(nursery, tmp_path / "replica")
        await _apply_all(store, "app.db", files[:2])
        before = (store.get("app.db").db_path).read_bytes()  # type: ignore[union-attr]
        with pytest.raises(ReplicationError, match="does not continue"):
            await _apply_all(store, "app.db", [files[3]])
        bad = store.incoming_path("app.db")
        data = bytearray(files[2].read_bytes())
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        with pytest.raises(Exception, match=r"checksum|LTX|lz4|corrupt"):
            await store.apply_ltx("app.db", bad)
        assert store.get("app.db").db_path.read_bytes() == before  # type: ignore[union-attr]
        assert store.get("app.db").pos.txid == 2  # type: ignore[union-attr]
        await _apply_all(store, "app.db", files[2:])
        rows = await trio.to_thread.run_sync(_query, mnt / "app.db", "SELECT sum(n) FROM t")
        assert rows == [(15,)]
        nursery.cancel_scope.cancel()


async def test_offline_database_is_repaired_by_a_snapshot(node_factory, tmp_path: Path) -> None:
    """No wipe needed: a replica database whose history failed its check at startup
    is replaced by the primary's snapshot, and what it had is kept aside."""
    from litefspy.ltx.apply import apply_files, encode_database

    primary = _primary_history(node_factory, 7)
    files = primary.ltx_files("app.db")
    replica_root = tmp_path / "replica"
    async with trio.open_nursery() as nursery:
        store, _mnt = await _mounted_replica(nursery, replica_root)
        await _apply_all(store, "app.db", files[:4])
        nursery.cancel_scope.cancel()
    store.close()  # a restart of the replica
    newest = sorted((replica_root / "data/dbs/app.db/ltx").glob("*.ltx"))[-1]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    newest.write_bytes(bytes(raw))
    # The primary's state as a snapshot (min 1, max = its TXID).
    materialized = tmp_path / "materialized.db"
    txid, _ = apply_files(materialized, files)
    snap = tmp_path / "snap.ltx"
    encode_database(materialized, snap, txid=txid)
    async with trio.open_nursery() as nursery:
        store, mnt = await _mounted_replica(nursery, replica_root)
        assert "app.db" in store.failed
        incoming = store.incoming_path("app.db")
        shutil.copyfile(snap, incoming)
        pos = await store.apply_ltx("app.db", incoming)
        assert pos.txid == len(files)
        assert "app.db" not in store.failed
        rows = await trio.to_thread.run_sync(_query, mnt / "app.db", "SELECT sum(n) FROM t")
        assert rows == [(28,)]
        asides = list((replica_root / "data/dbs/app.db").glob("aside-*"))
        assert len(asides) == 1 and (asides[0] / "database").exists()
        nursery.cancel_scope.cancel()


async def test_deletion_applies_from_a_diverged_position(node_factory, tmp_path: Path) -> None:
    primary = _primary_history(node_factory, 5)
    (primary.mnt / "app.db").unlink()
    files = primary.ltx_files("app.db")
    async with trio.open_nursery() as nursery:
        store, mnt = await _mounted_replica(nursery, tmp_path / "replica")
        await _apply_all(store, "app.db", files[:3])  # behind: misses files 4..n-1
        await _apply_all(store, "app.db", files[-1:])  # the deletion
        assert not await trio.to_thread.run_sync((mnt / "app.db").exists)
        assert list((tmp_path / "replica/data/dbs/app.db").glob("aside-*"))
        nursery.cancel_scope.cancel()
