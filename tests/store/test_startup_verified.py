"""Startup after a crash decodes a large newest LTX file once, not at every start.

The first start that checks a large LTX file in full records it (name and
file stamp, after an fsync); a later start after a crash reads only its ends
while the file is unchanged. Any change to the file (its stamp includes the
ctime, which no tool can set back) sends startup back to the full check, which
keeps a damaged file's database offline.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from litefspy.ltx.format import Header, Trailer
from litefspy.store import recovery
from litefspy.store.cleanstop import VERIFIED
from litefspy.store.store import Store


def _big_database(data: Path) -> None:
    """A 12 MiB database in the data directory, adopted at the first start."""
    path = data / "dbs" / "big.db" / "database"
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(4000))", [()] * 3000)
    conn.commit()
    conn.close()


def _crashed_start(data: Path) -> Store:
    """Open the store as a start after a crash does: no clean-stop record.

    (The store is closed again at once, to free the data directory: what a
    crash would have left is then made by removing the clean-stop records.)
    """
    for record in data.glob("dbs/*/clean.sums"):
        record.unlink()
    store = Store(data)
    try:
        store.open()
    finally:
        store.close()
    return store


def test_a_large_newest_ltx_is_decoded_once_across_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    _big_database(data)
    _crashed_start(data)  # adopts the file: a ~12 MiB snapshot LTX
    verified: list[str] = []
    real = recovery.verify_file

    def counting(path: Path) -> tuple[Header, Trailer]:
        verified.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(recovery, "verify_file", counting)
    store = _crashed_start(data)
    db = store.get("big.db")
    assert db is not None
    pos = db.pos
    newest = db.ltx_files()[-1][2]
    assert verified == [newest.name]  # checked in full once
    assert (db.dir / VERIFIED).exists()

    verified.clear()
    store = _crashed_start(data)
    again = store.get("big.db")
    assert again is not None and again.pos == pos
    assert verified == []  # unchanged since: only its header and trailer were read

    # A damaged file has another stamp: the full check runs and refuses it.
    with open(newest, "r+b") as f:
        f.seek(newest.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    store = _crashed_start(data)
    assert "file checksum mismatch" in store.failed["big.db"]  # offline, not served
    assert newest.name in store.failed["big.db"]
    assert verified == [newest.name, newest.name]  # torn-tail check, then recovery's
