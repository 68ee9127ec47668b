"""Backups meeting a full disk: a restore onto a device without room says so in one
line and leaves nothing behind (the output path and the device stay as they were)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import trio

from litefspy.backup.target import Target
from litefspy.backup.uploader import Uploader
from litefspy.config import parse_target
from litefspy.store.store import Store
from tests.support.disk import small_tmpfs


def _backed_up_database(tmp_path: Path, url: str) -> None:
    """A ~6 MiB database adopted by a store and uploaded as one snapshot object."""
    path = tmp_path / "data" / "dbs" / "app.db" / "database"
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(4000))", [()] * 1500)
    conn.commit()
    conn.close()
    store = Store(tmp_path / "data")
    store.open()
    try:
        uploader = Uploader(store, Target(parse_target(url)), epoch=lambda: 1)
        trio.run(uploader.sync_database, "app.db")
        assert uploader.totals.objects_uploaded == 1
    finally:
        store.close()


def _restore(url: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "litefspy",
            "restore",
            "--url",
            url,
            "--db",
            "app.db",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_restore_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/backup"
    _backed_up_database(tmp_path, url)
    with small_tmpfs(tmp_path / "small", "2m") as small:
        res = _restore(url, small / "restored.db")
        assert res.returncode == 1, res
        assert res.stderr.count("\n") == 1, res.stderr
        assert "no space left on the device" in res.stderr
        assert "Traceback" not in res.stderr
        assert list(small.iterdir()) == []  # no partial database, no work directory
        # With room, the same command restores it.
        res = _restore(url, tmp_path / "restored.db")
        assert res.returncode == 0, res.stderr
        conn = sqlite3.connect(tmp_path / "restored.db")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1500,)
        conn.close()
