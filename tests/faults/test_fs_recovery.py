"""Crash and corruption recovery of a single node, through a real mount."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fs.test_fs_capture import MODES, assert_reproduces, connect
from tests.support.nodes import NodeProcess, wait_for

WRITER = r"""
import sqlite3, sys
path, mode = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(path, isolation_level=None, timeout=30)
conn.execute(f"PRAGMA journal_mode={mode}")
conn.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v BLOB)")
i = conn.execute("SELECT coalesce(max(i), 0) FROM t").fetchone()[0]
while True:
    i += 1
    try:
        conn.execute("INSERT INTO t VALUES (?, randomblob(700))", (i,))
    except sqlite3.Error:
        sys.exit(0)          # the mount went away under us
    print(i, flush=True)     # only printed once COMMIT returned
"""


def _save_db_files(node: NodeProcess, dest: Path) -> None:
    """Copy the database's real files (not its LTX history) aside."""
    shutil.copytree(node.data / "dbs" / "app.db", dest, ignore=shutil.ignore_patterns("ltx"))


def _restore_db_files(node: NodeProcess, saved: Path) -> None:
    """Put the saved database files back, as a power loss could leave them."""
    dbdir = node.data / "dbs" / "app.db"
    for name in ("database", "wal", "shm"):
        (dbdir / name).unlink(missing_ok=True)
        if (saved / name).exists():
            shutil.copyfile(saved / name, dbdir / name)


def _committed(out: bytes) -> int:
    lines = [ln for ln in out.decode().split("\n") if ln.strip()]
    return int(lines[-1]) if lines else 0


@pytest.mark.parametrize("mode", MODES)
def test_kill_litefspy_during_writes_then_restart(
    node: NodeProcess, tmp_path: Path, mode: str
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(node.db("app.db")), mode], stdout=subprocess.PIPE
    )
    assert writer.stdout is not None
    wait_for(
        lambda: node.ltx_dir("app.db").exists() and len(node.ltx_files("app.db")) > 40,
        what="writes",
    )
    os.kill(node.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    out, _ = writer.communicate(timeout=30)
    acknowledged = _committed(out)
    assert acknowledged > 30
    node.stop()
    node.start()
    conn = sqlite3.connect(node.db("app.db"))
    present = {r[0] for r in conn.execute("SELECT i FROM t")}
    assert set(range(1, acknowledged + 1)) <= present  # every acknowledged commit survived
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    # Writes go on after recovery and the chain still reproduces the database.
    conn = connect(node.db("app.db"), mode)
    conn.execute("INSERT INTO t VALUES (NULL, x'01')")
    conn.close()
    assert_reproduces(node, "app.db", mode, tmp_path)


@pytest.mark.parametrize("mode", ["delete", "persist", "wal"])
def test_kill_app_mid_transaction(node: NodeProcess, tmp_path: Path, mode: str) -> None:
    conn = connect(node.db("app.db"), mode)
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("INSERT INTO t VALUES (1, x'01')")
    before = node.pos("app.db")
    conn.close()
    script = (
        "import sqlite3, os, signal\n"
        f"c = sqlite3.connect({str(node.db('app.db'))!r}, isolation_level=None)\n"
        f"c.execute('PRAGMA journal_mode={mode}'); c.execute('PRAGMA cache_size=5')\n"
        "c.execute('BEGIN')\n"
        "for i in range(2, 3000): c.execute('INSERT INTO t VALUES (?, randomblob(900))', (i,))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -signal.SIGKILL
    # The next connection rolls the hot journal back (or ignores the WAL tail).
    conn = connect(node.db("app.db"), mode)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert node.pos("app.db") == before
    conn.execute("INSERT INTO t VALUES (2, x'02')")
    conn.close()
    assert node.pos("app.db")[0] == before[0] + 1
    assert_reproduces(node, "app.db", mode, tmp_path)


def _write_rows(node: NodeProcess, mode: str, n: int) -> None:
    conn = connect(node.db("app.db"), mode)
    conn.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(n):
        conn.execute("INSERT INTO t VALUES (NULL, randomblob(2000))")
    conn.close()


def test_corrupt_newest_ltx_is_refused_with_its_name(node: NodeProcess) -> None:
    _write_rows(node, "delete", 5)
    node.stop()
    newest = node.ltx_files("app.db")[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40
    newest.write_bytes(bytes(data))
    node.start()
    log = node.log()
    assert "database offline" in log and newest.name in log
    # The database is not served rather than served wrong.
    with pytest.raises(OSError):
        (node.mnt / "app.db").read_bytes()


def test_corrupt_page_not_covered_is_refused(node: NodeProcess) -> None:
    _write_rows(node, "delete", 40)
    conn = sqlite3.connect(node.db("app.db"), isolation_level=None)
    conn.execute("UPDATE t SET v = x'00' WHERE i = 40")  # newest LTX covers few pages
    conn.close()
    node.stop()
    db = node.data / "dbs" / "app.db" / "database"
    raw = bytearray(db.read_bytes())
    raw[4096 * 3 + 100] ^= 0xFF  # page 4: written long before the newest transaction
    db.write_bytes(bytes(raw))
    node.start()
    log = node.log()
    assert "database offline" in log
    assert "does not match its post-apply checksum" in log


def test_corrupt_page_covered_by_newest_ltx_is_recovered(node: NodeProcess, tmp_path: Path) -> None:
    _write_rows(node, "delete", 10)
    node.stop()
    db = node.data / "dbs" / "app.db" / "database"
    raw = bytearray(db.read_bytes())
    raw[24] ^= 0xFF  # page 1 (the change counter) is in every transaction's LTX
    db.write_bytes(bytes(raw))
    node.start()
    conn = sqlite3.connect(node.db("app.db"))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 10
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert_reproduces(node, "app.db", "delete", tmp_path)


def test_wal_state_behind_history_rolls_forward(node: NodeProcess, tmp_path: Path) -> None:
    """After a power loss, WAL frames may be gone while their (later fsynced) LTX
    files survived: recovery re-applies the history forward from the database."""
    conn = connect(node.db("app.db"), "wal", synchronous="normal", wal_autocheckpoint=0)
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(5):
        conn.execute("INSERT INTO t VALUES (NULL, randomblob(3000))")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    node.stop()
    saved = tmp_path / "saved"
    _save_db_files(node, saved)
    node.start()
    conn = connect(node.db("app.db"), "wal", synchronous="normal", wal_autocheckpoint=0)
    for _ in range(7):
        conn.execute("INSERT INTO t VALUES (NULL, randomblob(3000))")
    conn.close()
    expected = node.pos("app.db")
    node.stop()
    # Simulate the loss: database and WAL as they were 7 commits ago, LTX files intact.
    _restore_db_files(node, saved)
    node.start()
    assert node.pos("app.db") == expected
    assert "rolled forward from the LTX files" in node.log()
    assert "lost" not in node.log()  # nothing was: the LTX files had every write
    conn = sqlite3.connect(node.db("app.db"))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 12
    conn.close()
    assert_reproduces(node, "app.db", "wal", tmp_path)


def test_non_sqlite_writes_and_unsupported_journal_modes_are_refused(node: NodeProcess) -> None:
    with pytest.raises(OSError):
        (node.mnt / "notes.txt").write_text("hello")
    for mode in ("memory", "off"):
        conn = sqlite3.connect(node.db(f"{mode}.db"), isolation_level=None)
        conn.execute(f"PRAGMA journal_mode={mode}")
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("CREATE TABLE t (x)")
        conn.close()
    with pytest.raises(OSError):
        (node.mnt / "sub").mkdir()
    assert "no transaction is open" in node.log()
    time.sleep(0.1)
    assert node.proc is not None and node.proc.poll() is None  # the mount survived


def test_ltx_file_cut_short_by_a_crash_is_dropped(node: NodeProcess, tmp_path: Path) -> None:
    """A WAL commit's LTX file is synced with the WAL: after a power loss the newest
    file can be cut short together with the commit's frames. Recovery drops it."""
    conn = connect(node.db("app.db"), "wal", synchronous="normal", wal_autocheckpoint=0)
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(4):
        conn.execute("INSERT INTO t VALUES (NULL, randomblob(3000))")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = node.pos("app.db")
    conn.close()
    node.stop()
    saved = tmp_path / "saved"
    _save_db_files(node, saved)
    node.start()
    conn = connect(node.db("app.db"), "wal", synchronous="normal", wal_autocheckpoint=0)
    conn.execute("INSERT INTO t VALUES (NULL, randomblob(3000))")
    conn.close()
    node.stop()
    _restore_db_files(node, saved)
    newest = node.ltx_files("app.db")[-1]
    newest.write_bytes(newest.read_bytes()[:150])
    node.start()
    assert "cut short by a crash" in node.log()
    assert node.pos("app.db") == before
    conn = sqlite3.connect(node.db("app.db"))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 4
    conn.close()
    assert_reproduces(node, "app.db", "wal", tmp_path)


def test_synced_ltx_whose_rename_was_lost_is_recovered(node: NodeProcess) -> None:
    _write_rows(node, "delete", 6)
    expected = node.pos("app.db")
    node.stop()
    newest = node.ltx_files("app.db")[-1]
    newest.rename(newest.with_name(newest.name + ".tmp"))
    node.start()
    assert node.pos("app.db") == expected
    assert "rename was lost" in node.log()


def test_restart_over_a_stale_mount_cleans_it_up(node: NodeProcess) -> None:
    _write_rows(node, "delete", 3)
    expected = node.pos("app.db")
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()
    node.proc = None  # leave the dead mount in place, as a crash would
    with pytest.raises(OSError):
        os.listdir(node.mnt)  # ENOTCONN: "Transport endpoint is not connected"
    node.start()
    assert "cleaning up stale mount" in node.log()
    assert node.pos("app.db") == expected
