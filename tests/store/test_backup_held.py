"""The backup uploader encodes each interval from the pages commits captured.

Real SQLite commits into a store (tests/support/store_vfs.py), the uploader
runs its loop against a file:// target, and every object it uploads must
restore into exactly what SQLite had at that object's last TXID, without the
uploader ever reading the LTX files back to merge them (the merge function
is not called once the first snapshot is up).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from litefspy.backup.layout import parse_listing
from litefspy.backup.restore import restore_database
from litefspy.backup.target import Target
from litefspy.backup.uploader import Uploader
from litefspy.backup.worker import merge_to_file
from litefspy.config import parse_target
from litefspy.ltx.format import Header, Trailer
from litefspy.store.store import Store
from tests.support.store_vfs import BLOBS, StoreVFS, dump


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_uploads_from_captured_pages_restore_every_object(tmp_path: Path, mode: str) -> None:
    store = Store(tmp_path / "data")
    store.open()
    target = Target(parse_target(f"file://{tmp_path}/backup"))
    merged: list[int] = []

    def merge(paths: list[Path], out: Path, tmp_dir: Path) -> tuple[Header, Trailer]:
        merged.append(len(paths))
        return merge_to_file(paths, out, tmp_dir)

    uploader = Uploader(store, target, epoch=lambda: 1, sync_interval=0.1, merge=merge)
    vfs = StoreVFS(store, f"held-{mode}")
    conn = vfs.connect("app.db")
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("PRAGMA cache_size=8")  # the big transaction spills before its commit
    conn.execute("CREATE TABLE t (n INTEGER, b BLOB)")
    db = store.get("app.db")
    assert db is not None
    states: dict[int, list[str]] = {}

    def record() -> None:
        if mode == "wal":
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a file copy then holds it all
        states[db.pos.txid] = dump(db.db_path)

    def batches() -> list[list[str]]:
        return [
            [f"INSERT INTO t (n) VALUES ({i})" for i in range(1, 30)],
            [BLOBS.format(n=150, size=3000)],  # one transaction of ~120 pages
            ["UPDATE t SET n = n + 1000 WHERE n > 10", "DELETE FROM t WHERE n < -50"],
            ["VACUUM"],  # the database shrinks: pages past the end must go
            [f"INSERT INTO t (n) VALUES ({i})" for i in range(5)],
        ]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uploader.run)
            record()
            await trio.sleep(0.35)  # the first upload: a snapshot
            for batch in batches():
                for sql in batch:
                    conn.execute(sql)
                    record()
                await trio.sleep(0.35)
            with trio.fail_after(10):
                while uploader.totals.per_db["app.db"].uploaded != db.pos:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    conn.close()
    assert merged == []  # every interval went up from memory
    listing = parse_listing("app.db", target.objects("app.db/"))
    ends = sorted(p.max_txid for p in listing.pieces if p.level == "l0")
    assert len(ends) >= len(batches())
    for txid in ends:
        out = tmp_path / f"restored-{txid}.db"
        restore_database(target, "app.db", out, txid=txid)
        assert dump(out) == states[txid], f"TXID {txid}"
    store.close()
