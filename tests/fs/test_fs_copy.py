"""Copying a database file into the mount (cp, shutil.copy, rsync) is an import.

The copy is staged outside the database until its writer closes it, then
validated and committed as one transaction that replicas receive; anything that
is not a whole SQLite database is refused and leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import dump, replica_of, wait_same_pos
from tests.support.nodes import NodeProcess, wait_for

COPIERS = ["cp", "shutil", "rsync"]


def _source(path: Path, rows: int, mode: str = "delete") -> Path:
    path.unlink(missing_ok=True)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"PRAGMA journal_mode={mode}")
    c.execute("CREATE TABLE a (i INTEGER PRIMARY KEY, v BLOB)")
    c.executemany("INSERT INTO a VALUES (?, randomblob(300))", [(i,) for i in range(rows)])
    if mode == "wal":
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    return path


def _copy(copier: str, src: Path, dst: Path) -> subprocess.CompletedProcess[str]:
    if copier == "cp":
        cmd = ["cp", str(src), str(dst)]
    elif copier == "rsync":
        cmd = ["rsync", str(src), str(dst)]
    else:
        cmd = [
            sys.executable,
            "-c",
            "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
            str(src),
            str(dst),
        ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _count(path: Path) -> int:
    c = sqlite3.connect(path, timeout=30)
    try:
        return int(c.execute("SELECT count(*) FROM a").fetchone()[0])
    finally:
        c.close()


@pytest.mark.parametrize("copier", COPIERS)
def test_copy_in_is_imported_and_replicated(node_factory, tmp_path: Path, copier: str) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    # A new name.
    out = _copy(copier, _source(tmp_path / "one.db", 100), primary.db("new.db"))
    assert out.returncode == 0, out.stderr
    assert _count(primary.db("new.db")) == 100
    assert primary.pos("new.db")[0] == 1
    # Over an existing database, with connections open to it.
    app = sqlite3.connect(primary.db("app.db"), isolation_level=None, timeout=30)
    app.execute("CREATE TABLE a (i INTEGER PRIMARY KEY, v BLOB)")
    app.execute("INSERT INTO a VALUES (1, x'01')")
    reader = sqlite3.connect(primary.db("app.db"), isolation_level=None, timeout=30)
    assert reader.execute("SELECT count(*) FROM a").fetchone()[0] == 1
    before = primary.pos("app.db")[0]
    out = _copy(copier, _source(tmp_path / "two.db", 300), primary.db("app.db"))
    assert out.returncode == 0, out.stderr
    assert primary.pos("app.db")[0] == before + 1
    assert reader.execute("SELECT count(*) FROM a").fetchone()[0] == 300
    app.execute("INSERT INTO a VALUES (1000, x'02')")  # writes go on
    assert _count(primary.db("app.db")) == 301
    for name in ("new.db", "app.db"):
        wait_same_pos(primary, [replica], name)
        assert dump(replica, name) == dump(primary, name)
    app.close()
    reader.close()
    assert os.listdir(primary.data / "tmp") == []
    assert "refused" not in primary.log()


@pytest.mark.parametrize("copier", COPIERS)
def test_non_sqlite_file_is_refused_and_leaves_nothing(
    node: NodeProcess, tmp_path: Path, copier: str
) -> None:
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"not a database\n" * 5000)
    out = _copy(copier, junk, node.db("junk.db"))
    assert out.returncode != 0
    assert not node.db("junk.db").exists()
    assert not (node.data / "dbs" / "junk.db" / "database").exists()
    # Over an existing database: it stays as it was.
    c = sqlite3.connect(node.db("app.db"), isolation_level=None)
    c.execute("CREATE TABLE a (i)")
    c.execute("INSERT INTO a VALUES (1)")
    c.close()
    pos = node.pos("app.db")
    out = _copy(copier, junk, node.db("app.db"))
    assert out.returncode != 0
    assert _count(node.db("app.db")) == 1
    assert node.pos("app.db") == pos
    assert "not a SQLite database" in node.log()
    wait_for(lambda: os.listdir(node.data / "tmp") == [], what="staged copies removed")


def test_copying_sidecars_in_is_refused_with_advice(node: NodeProcess, tmp_path: Path) -> None:
    src = _source(tmp_path / "s.db", 10)
    for suffix in ("-wal", "-journal"):
        out = _copy("cp", src, node.db("app.db" + suffix))
        assert out.returncode != 0
        assert not node.db("app.db" + suffix).exists()
    assert "copy the database file instead" in node.log()


def test_copy_still_open_is_invisible_then_complete(node: NodeProcess, tmp_path: Path) -> None:
    data = _source(tmp_path / "s.db", 200).read_bytes()
    c = sqlite3.connect(node.db("app.db"), isolation_level=None)
    c.execute("CREATE TABLE a (i)")
    c.execute("INSERT INTO a VALUES (1)")
    c.close()
    for name, seen_before in (("new.db", None), ("app.db", 1)):
        with open(node.db(name), "wb") as f:
            f.write(data)
            f.flush()
            # Another process does not see the copy yet.
            check = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import os, sqlite3, sys\n"
                    "p = sys.argv[1]\n"
                    "if not os.path.exists(p): print('absent')\n"
                    "else: print(sqlite3.connect(p).execute('SELECT count(*) FROM a').fetchone()[0])",  # noqa: E501
                    str(node.db(name)),
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            assert check.stdout.strip() == ("absent" if seen_before is None else str(seen_before))
        assert _count(node.db(name)) == 200


def test_copy_killed_midway_imports_nothing(node: NodeProcess, tmp_path: Path) -> None:
    data = _source(tmp_path / "s.db", 3000).read_bytes()
    assert len(data) > 2 * 65536
    c = sqlite3.connect(node.db("app.db"), isolation_level=None)
    c.execute("CREATE TABLE a (i)")
    c.execute("INSERT INTO a VALUES (1)")
    c.close()
    pos = node.pos("app.db")
    half = tmp_path / "half"
    half.write_bytes(data)
    for name in ("new.db", "app.db"):
        # A copier writes part of the file, then is killed.
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys, time\n"
                "data = open(sys.argv[1], 'rb').read()\n"
                "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
                "os.write(fd, data[: len(data) // 2 // 4096 * 4096])\n"
                "print('written', flush=True)\n"
                "time.sleep(60)\n",
                str(half),
                str(node.db(name)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        refusal = f"copy into {name} refused"
        wait_for(lambda r=refusal: r in node.log(), what=refusal)
    assert not node.db("new.db").exists()
    assert _count(node.db("app.db")) == 1
    assert node.pos("app.db") == pos
    time.sleep(0.1)
    assert os.listdir(node.data / "tmp") == []


def test_copy_on_a_replica_is_refused(node_factory, tmp_path: Path) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    out = _copy("cp", _source(tmp_path / "s.db", 10), replica.db("new.db"))
    assert out.returncode != 0
    assert not replica.db("new.db").exists()
