"""Operations.enable_timing reports each FUSE request's duration (for metrics)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.store.store import Store


async def test_timing_observes_real_requests(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    ops = Operations(store)
    seen: list[tuple[str, float]] = []
    ops.enable_timing(lambda op, seconds: seen.append((op, seconds)))

    def work(mnt: Path) -> None:
        conn = sqlite3.connect(mnt / "a.db", isolation_level=None)
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.close()

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve(ops, tmp_path / "mnt", task_status=task_status)
        )
        await trio.to_thread.run_sync(work, tmp_path / "mnt")
        nursery.cancel_scope.cancel()
    ops_seen = {op for op, _ in seen}
    assert {"create", "write", "fsync"} <= ops_seen
    assert all(seconds >= 0 for _, seconds in seen)
    assert store.get("a.db").pos.txid == 2  # type: ignore[union-attr]
