"""`litefspy import` / `export` against the Data service of an in-process store and mount."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import trio

from litefspy.api.data import IMPORT_METHOD
from litefspy.rpc.client import call_client_stream
from litefspy.rpc.errors import RemoteError
from litefspy.v1 import data_pb2 as pb
from tests.support.nodes import free_port
from tests.support.services_harness import (
    cli,
    corrupt_db,
    dump,
    make_db,
    mounted_node,
    query,
    run_sql,
)


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
async def test_import_then_export_round_trip(tmp_path: Path, mode: str) -> None:
    src = tmp_path / "src.db"
    make_db(src, 400)
    async with mounted_node(tmp_path / "node") as n:
        db = n.db("app.db")
        await trio.to_thread.run_sync(
            run_sql, db, "CREATE TABLE old (x); INSERT INTO old VALUES (1);", mode
        )
        before = n.store.get("app.db").pos  # type: ignore[union-attr]

        res = await cli("import", "--name", "app.db", str(src), "--url", n.url)
        assert res.returncode == 0, res.stderr
        pos = n.store.get("app.db").pos  # type: ignore[union-attr]
        assert pos.txid == before.txid + 1
        assert f"txid {pos.txid:016x}/{pos.checksum:016x}".encode() in res.stdout
        assert await trio.to_thread.run_sync(query, db, "SELECT count(*) FROM t") == [(400,)]
        # Writes go on on top of the imported content.
        await trio.to_thread.run_sync(run_sql, db, "INSERT INTO t (v) VALUES ('after');")

        out = tmp_path / "out" / "export.db"
        out.parent.mkdir()
        out.write_bytes(b"stale content is replaced")
        res = await cli("export", "--name", "app.db", str(out), "--url", n.url)
        assert res.returncode == 0, res.stderr
        pos = n.store.get("app.db").pos  # type: ignore[union-attr]
        assert f"txid {pos.txid:016x}/{pos.checksum:016x}".encode() in res.stdout
        assert _integrity(out) == "ok"
        assert dump(out) == await trio.to_thread.run_sync(dump, db)
        assert [p.name for p in out.parent.iterdir()] == ["export.db"]  # no temp file left
        # The node's spool directory is left empty.
        assert list(n.store.tmp_dir.iterdir()) == []


async def test_import_refusals_leave_the_database_alone(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"hello world" * 1000)
    corrupt = tmp_path / "corrupt.db"
    corrupt_db(corrupt)
    good = tmp_path / "good.db"
    make_db(good, 10)
    async with mounted_node(tmp_path / "node") as n:
        db = n.db("app.db")
        await trio.to_thread.run_sync(run_sql, db, "CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        before = n.store.get("app.db").pos  # type: ignore[union-attr]

        cases = [
            (tmp_path / "missing.db", "no such file"),
            (junk, "not a SQLite database"),
            (corrupt, "integrity_check|malformed|failed to open"),
        ]
        for path, message in cases:
            res = await cli("import", "--name", "app.db", str(path), "--url", n.url)
            assert res.returncode == 1, res
            err = res.stderr.decode()
            assert err.startswith("litefspy: cannot import app.db: ") and err.count("\n") == 1
            assert re.search(message, err), err

        # The node validates what it receives too (a client without the local check).
        def upload(data: bytes) -> None:
            reqs = iter(
                [
                    pb.ImportRequest(start=pb.ImportStart(name="app.db", size=len(data))),
                    pb.ImportRequest(data=data),
                ]
            )
            call_client_stream(
                n.url,
                IMPORT_METHOD,
                reqs,
                request_type=pb.ImportRequest,
                response_type=pb.ImportReply,
                timeout=30,
            )

        with pytest.raises(RemoteError, match=r"integrity_check|malformed") as info:
            await trio.to_thread.run_sync(upload, corrupt.read_bytes())
        assert "the uploaded file" in str(info.value) and str(n.store.tmp_dir) not in str(
            info.value
        )

        # An upload that ends short of its announced size is refused.
        def short_upload() -> None:
            data = good.read_bytes()
            reqs = iter(
                [
                    pb.ImportRequest(start=pb.ImportStart(name="app.db", size=len(data) + 1)),
                    pb.ImportRequest(data=data),
                ]
            )
            call_client_stream(
                n.url,
                IMPORT_METHOD,
                reqs,
                request_type=pb.ImportRequest,
                response_type=pb.ImportReply,
                timeout=30,
            )

        with pytest.raises(RemoteError, match="ended after"):
            await trio.to_thread.run_sync(short_upload)

        # An invalid name is refused before anything is written.
        res = await cli("import", "--name", "a/b", str(good), "--url", n.url)
        assert res.returncode == 1 and b"invalid database name" in res.stderr

        assert n.store.get("app.db").pos == before  # type: ignore[union-attr]
        assert await trio.to_thread.run_sync(query, db, "SELECT * FROM t") == [(1,)]
        assert list(n.store.tmp_dir.iterdir()) == []


async def test_import_on_a_replica_names_the_primary(tmp_path: Path) -> None:
    good = tmp_path / "good.db"
    make_db(good, 10)
    async with mounted_node(tmp_path / "node", hostname="node-b") as n:
        n.node.set_role(False, "node-a")
        res = await cli("import", "--name", "app.db", str(good), "--url", n.url)
        assert res.returncode == 1
        assert res.stderr.decode() == (
            "litefspy: cannot import app.db: node node-b is not the primary "
            "(primary is node-a); import on the primary\n"
        )
        assert n.store.get("app.db") is None


async def test_export_errors(tmp_path: Path) -> None:
    async with mounted_node(tmp_path / "node") as n:
        out = tmp_path / "out.db"
        res = await cli("export", "--name", "nope.db", str(out), "--url", n.url)
        assert res.returncode == 1
        assert res.stderr.decode() == (
            "litefspy: cannot export nope.db: node node-a has no database named nope.db\n"
        )
        assert not out.exists()
        res = await cli("export", "--name", "x.db", str(tmp_path / "no" / "dir.db"), "--url", n.url)
        assert res.returncode == 1 and b"does not exist" in res.stderr


async def test_unreachable_node(tmp_path: Path) -> None:
    good = tmp_path / "good.db"
    make_db(good, 1)
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("import", "--name", "app.db", str(good)),
        ("export", "--name", "app.db", str(tmp_path / "out.db")),
    ):
        res = await cli(*args, "--url", url)
        assert res.returncode == 1
        err = res.stderr.decode()
        assert f"cannot reach litefspy node at {url}" in err and err.count("\n") == 1
