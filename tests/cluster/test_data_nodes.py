"""`litefspy import` / `export` against real node processes (a primary and a replica)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import connect, dump, integrity, replica_of, try_pos, wait_same_pos
from tests.support.nodes import NodeProcess
from tests.support.services_harness import corrupt_db, make_db


def litefspy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def _file_dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_import_replicates_and_export_matches(node_factory, tmp_path: Path, mode: str) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica: NodeProcess = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"), mode)
    conn.execute("CREATE TABLE old (x)")
    conn.execute("INSERT INTO old VALUES (1)")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")

    src = tmp_path / "src.db"
    make_db(src, 300, mode=mode)
    # The default URL comes from the fuse.yml in the working directory.
    res = litefspy("import", "--name", "app.db", str(src), cwd=primary.root)
    assert res.returncode == 0, res.stderr
    txid = wait_same_pos(primary, [replica], "app.db")[0]
    assert f"txid {txid:016x}" in res.stdout
    assert dump(replica, "app.db") == _file_dump(src)

    # Writes go on on top of the import, and replicate.
    conn = connect(primary.db("app.db"))
    conn.execute("INSERT INTO t (v) VALUES ('after')")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")

    # Export from the replica: the same logical content as the primary's.
    out = tmp_path / "export.db"
    res = litefspy("export", "--name", "app.db", str(out), "--url", replica.url)
    assert res.returncode == 0, res.stderr
    assert _file_dump(out) == dump(primary, "app.db")
    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_refusals_change_nothing(node_factory, tmp_path: Path) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica: NodeProcess = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    before = wait_same_pos(primary, [replica], "app.db")

    corrupt = tmp_path / "corrupt.db"
    corrupt_db(corrupt)
    good = tmp_path / "good.db"
    make_db(good, 5)
    missing = str(tmp_path / "nope.db")
    cases = [
        (("import", "--name", "app.db", str(corrupt), "--url", primary.url), "malformed"),
        (("import", "--name", "app.db", missing, "--url", primary.url), "no such"),
        (
            ("import", "--name", "app.db", str(good), "--url", replica.url),
            "node replica is not the primary (primary is primary)",
        ),
        (
            ("export", "--name", "other.db", str(tmp_path / "o.db"), "--url", replica.url),
            "has no database named other.db",
        ),
    ]
    for args, message in cases:
        res = litefspy(*args)
        assert res.returncode == 1, (args, res)
        assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert primary.pos("app.db") == before and try_pos(replica, "app.db") == before
    assert integrity(primary, "app.db") == "ok"
    assert not (tmp_path / "o.db").exists()
