"""Import / export through the store, with SQLite connections open on a real mount."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
import trio

from litefspy.errors import DatabaseError
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.ltx.decoder import verify_file
from litefspy.store.store import Store
from tests.support.mounted import attach_store

# Holds one connection open across the import; reports what it sees before and after.
HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30)
conn.execute(f"PRAGMA journal_mode={sys.argv[2]}")
print(conn.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
sys.stdin.readline()
print(conn.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
print(conn.execute("PRAGMA integrity_check").fetchone()[0], flush=True)
"""


def make_db(path: Path, rows: int, page_size: int = 4096, mode: str = "delete") -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i}" * 20,) for i in range(rows)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def _mounted_primary(nursery: trio.Nursery, root: Path) -> tuple[Store, Path]:
    store = Store(root / "data", strict_verify=True)
    store.open()
    ops = Operations(store)
    mnt = root / "mnt"
    await nursery.start(lambda task_status: serve(ops, mnt, task_status=task_status))
    await nursery.start(attach_store, store, mnt, ops)
    return store, mnt


def _run_sql(path: Path, mode: str, sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.executescript(sql)
    conn.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
async def test_import_replaces_content_seen_by_open_connections(tmp_path: Path, mode: str) -> None:
    # Connections stay open across the import: the new file has their page size and
    # journal mode (a change of either needs the applications to reconnect).
    src = tmp_path / "src.db"
    make_db(src, 500, mode=mode)
    async with trio.open_nursery() as nursery:
        store, mnt = await _mounted_primary(nursery, tmp_path / "node")
        await trio.to_thread.run_sync(
            _run_sql,
            mnt / "app.db",
            mode,
            "CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT); INSERT INTO t (v) VALUES ('old');",
        )
        before = store.get("app.db").pos  # type: ignore[union-attr]
        holder = await trio.lowlevel.open_process(
            [sys.executable, "-c", HOLDER, str(mnt / "app.db"), mode],
            stdin=-1,
            stdout=-1,
        )
        assert holder.stdout is not None and holder.stdin is not None
        out = b""

        async def lines(n: int) -> list[bytes]:
            nonlocal out
            while out.count(b"\n") < n:
                chunk = await holder.stdout.receive_some()  # type: ignore[union-attr]
                assert chunk, out
                out += chunk
            return out.split()

        assert await lines(1) == [b"1"]
        pos = await store.import_database("app.db", src)
        assert pos.txid == before.txid + 1
        await holder.stdin.send_all(b"go\n")
        assert await lines(3) == [b"1", b"500", b"ok"]
        assert await holder.wait() == 0
        # The import is one verified LTX file; writes continue on top of it.
        newest = store.get("app.db").ltx_files()[-1][2]  # type: ignore[union-attr]
        verify_file(newest)
        await trio.to_thread.run_sync(
            _run_sql, mnt / "app.db", mode, "INSERT INTO t (v) VALUES ('after');"
        )
        out_path = tmp_path / "export.db"
        exported = await store.export_database("app.db", out_path)
        assert exported == store.get("app.db").pos  # type: ignore[union-attr]
        conn = sqlite3.connect(out_path)
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 501
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        nursery.cancel_scope.cancel()


async def test_import_refuses_bad_files(tmp_path: Path) -> None:
    not_sqlite = tmp_path / "junk.db"
    not_sqlite.write_bytes(b"hello world" * 1000)
    truncated = tmp_path / "trunc.db"
    make_db(truncated, 300)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 1000])
    corrupt = tmp_path / "corrupt.db"
    make_db(corrupt, 3000)
    raw = bytearray(corrupt.read_bytes())
    for off in range(4096 * 3, 4096 * 6):  # smash interior b-tree pages
        raw[off] = 0xFF
    corrupt.write_bytes(bytes(raw))
    async with trio.open_nursery() as nursery:
        store, mnt = await _mounted_primary(nursery, tmp_path / "node")
        await trio.to_thread.run_sync(
            _run_sql, mnt / "app.db", "delete", "CREATE TABLE t (x); INSERT INTO t VALUES (1);"
        )
        before = store.get("app.db").pos  # type: ignore[union-attr]
        for bad, message in [
            (not_sqlite, "not a SQLite database"),
            (truncated, "not a whole number"),
            (corrupt, "integrity_check|malformed|failed to open"),
            (tmp_path / "missing.db", "no such file"),
        ]:
            with pytest.raises(DatabaseError, match=message):
                await store.import_database("app.db", bad)
        assert store.get("app.db").pos == before  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
