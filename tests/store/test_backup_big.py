"""Backup and restore of a database over 1 GiB (it spans SQLite's lock page).

The database is adopted by a store, uploaded by the real uploader to a
file:// target and restored with `litefspy restore`; the restored file must
pass SQLite's integrity check and hold the same rows, and its LTX checksum
(which restore verifies against the backup's) must be the source's.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from litefspy.backup.target import Target
from litefspy.backup.uploader import Uploader
from litefspy.config import parse_target
from litefspy.ltx.checksum import checksum_database_file
from litefspy.ltx.format import lock_pgno
from litefspy.store.store import Store

pytestmark = pytest.mark.slow

PAGE_SIZE = 65536
ROWS = 17_000  # one 60 KiB blob a row: ~1.06 GiB, past the lock page at 1 GiB


@pytest.fixture
def big_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, removed right after the test: pytest keeps old tmp dirs, not GiB files."""
    yield tmp_path
    shutil.rmtree(tmp_path)


def _rows(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        count, total = conn.execute("SELECT count(*), sum(n) FROM t").fetchone()
        return int(count), int(total)
    finally:
        conn.close()


def test_a_database_over_one_gib_restores_whole(big_dir: Path) -> None:
    src = big_dir / "data" / "dbs" / "big.db" / "database"
    src.parent.mkdir(parents=True)
    conn = sqlite3.connect(src)
    conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=off")
    conn.execute("CREATE TABLE t (n INTEGER, b BLOB)")
    conn.executemany("INSERT INTO t VALUES (?, zeroblob(61000))", ((i,) for i in range(ROWS)))
    conn.commit()
    conn.close()
    assert src.stat().st_size > lock_pgno(PAGE_SIZE) * PAGE_SIZE
    expected = _rows(src)
    with open(src, "rb") as f:
        checksum = checksum_database_file(f, PAGE_SIZE)

    url = f"file://{big_dir}/backup"
    store = Store(big_dir / "data")
    store.open()  # adopts the file
    try:
        uploader = Uploader(store, Target(parse_target(url)), epoch=lambda: 1)
        trio.run(uploader.sync_database, "big.db")
        assert uploader.totals.objects_uploaded == 1  # one snapshot
    finally:
        store.close()
    src.unlink()  # the original is gone: only the backup has it

    out = big_dir / "restored.db"
    args = ["restore", "--url", url, "--db", "big.db", "-o", str(out)]
    res = subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert f"(checksum {checksum:016x})" in res.stdout
    assert _rows(out) == expected
    with open(out, "rb") as f:
        assert checksum_database_file(f, PAGE_SIZE) == checksum
