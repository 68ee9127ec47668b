"""Continuous backup and point-in-time restore, through real nodes and real object stores.

`file://` for the fast cases; SeaweedFS (`weed mini` on loopback, never a
mock) for S3. Every restore is compared with the database's dump recorded
right after the commit it should reproduce.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import MODES, connect, dump, replica_of, status, wait_same_pos
from tests.support.etcd_server import etcd_shared_fixture  # noqa: F401
from tests.support.nodes import NodeProcess, wait_for
from tests.support.s3_server import SeaweedServer, s3_server  # noqa: F401

# Inserts 1, 2, 3...; prints each value and the monotonic time COMMIT returned.
ACK_WRITER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
i = 1
while True:
    try:
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    except sqlite3.Error:
        sys.exit(0)
    print(i, time.monotonic(), flush=True)
    i += 1
"""


def _backup_node(node_factory: Any, url: str, name: str = "primary", **kw: Any) -> NodeProcess:
    extra = f"backup:\n  url: {json.dumps(url)}\n  sync-interval: 200ms\n" + kw.pop("extra", "")
    return node_factory(name, config_extra=extra, **kw)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, **(env or {})),
    )


def restore(url: str, out: Path, *extra: str, db: str = "app.db") -> list[str]:
    """`litefspy restore` into `out` (replacing it), which must succeed; its dump."""
    res = cli("restore", "--url", url, "--db", db, "-o", str(out), "--force", *extra)
    assert res.returncode == 0, res.stderr
    return _dump_file(out)


def _dump_file(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def wait_backed_up(
    node: NodeProcess, name: str, timeout: float = 30, txid: int | None = None
) -> None:
    """Until the node's status says the backup has every transaction of `name` (to `txid`)."""
    target = f"{node.pos(name)[0] if txid is None else txid:016x}"

    def done() -> bool:
        backup = status(node).get("backup") or {}
        return any(
            d["name"] == name and d["uploaded_txid"] >= target for d in backup.get("databases", [])
        )

    wait_for(done, timeout, what=f"{name} backed up to {target}")


def _history(node: NodeProcess, mode: str, n: int = 6) -> list[tuple[int, int, list[str]]]:
    """n commits; after each: (txid, commit time ms, dump)."""
    conn = connect(node.db("app.db"), mode)
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    states = []
    for i in range(n):
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"row {i} " * (i + 1),))
        if i == 3:
            conn.execute("DELETE FROM t WHERE i = 2")
        when = time.time()
        states.append((node.pos("app.db")[0], int(when * 1000), dump(node, "app.db")))
        # Each in an upload of its own (its own restore point) however loaded the
        # machine, and the next commit well after `when` + 100 ms (restored by time).
        wait_backed_up(node, "app.db")
        time.sleep(max(0.0, when + 0.2 - time.time()))
    conn.close()
    return states


def _iso(ms: int) -> str:
    when = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.mark.parametrize("mode", MODES)
def test_restore_latest_txid_and_time_in_every_mode(
    node_factory, tmp_path: Path, mode: str
) -> None:
    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url).start()
    states = _history(primary, mode)
    wait_backed_up(primary, "app.db")
    out = tmp_path / "restored.db"
    res = cli("restore", "--url", url, "--db", "app.db", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert _dump_file(out) == states[-1][2]
    # Each earlier commit by TXID, and by the time right after it committed.
    for txid, when, expected in states[1:-1:2]:
        assert restore(url, out, "--txid", f"{txid:x}") == expected, f"TXID {txid}"
        assert restore(url, out, "--timestamp", _iso(when + 100)) == expected, f"at {txid}"
    listing = cli("backup", "list", "--url", url, "--json")
    assert listing.returncode == 0, listing.stderr
    (entry,) = json.loads(listing.stdout)
    assert entry["name"] == "app.db" and entry["newest"]["txid"] == f"{states[-1][0]:016x}"
    assert entry["branches"] == []


def test_restore_refusals_are_one_line(node_factory, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url).start()
    _history(primary, "delete", 3)
    wait_backed_up(primary, "app.db")
    out = tmp_path / "exists.db"
    out.write_bytes(b"keep me")
    cases = [
        (["--db", "app.db", "-o", str(out)], f"litefspy: {out} exists; pass --force to replace it"),
        (["--db", "nope.db", "-o", str(tmp_path / "n.db")], "has no database 'nope.db'"),
        (["--db", "app.db", "-o", str(tmp_path / "n.db"), "--txid", "zz"], "is not a hex TXID"),
        (["--db", "app.db", "-o", str(tmp_path / "n.db"), "--txid", "ffff"], "is past the newest"),
        (
            ["--db", "app.db", "-o", str(tmp_path / "n.db"), "--timestamp", "yesterday"],
            "is not an RFC 3339 time",
        ),
    ]
    for args, message in cases:
        res = cli("restore", "--url", url, *args)
        assert res.returncode == 1, res.stdout
        assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert out.read_bytes() == b"keep me"
    res = cli("restore", "--url", "gs://bucket/x", "--db", "app.db", "-o", str(tmp_path / "g"))
    assert res.returncode == 1
    assert "unknown scheme 'gs'" in res.stderr and res.stderr.count("\n") == 1


def test_corrupt_or_truncated_object_is_named_and_refused(node_factory, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url).start()
    _history(primary, "wal", 4)
    wait_backed_up(primary, "app.db")
    primary.stop()
    objects = sorted((tmp_path / "backup" / "app.db").rglob("*.ltx"))
    assert len(objects) >= 2
    victim = objects[-1]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    victim.write_bytes(bytes(raw))
    out = tmp_path / "r.db"
    res = cli("restore", "--url", url, "--db", "app.db", "-o", str(out))
    assert res.returncode == 1
    key = victim.relative_to(tmp_path / "backup").as_posix()
    assert f"backup object {key} is unusable" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    assert not out.exists()
    victim.write_bytes(bytes(raw[: len(raw) // 3]))
    res = cli("restore", "--url", url, "--db", "app.db", "-o", str(out))
    assert res.returncode == 1 and f"{key} is unusable: truncated" in res.stderr, res.stderr
    assert not out.exists() and not list(tmp_path.glob(".r.db.restore-*"))


def test_unknown_backup_scheme_in_fuse_yml_is_one_line(node_factory) -> None:
    node = _backup_node(node_factory, "ftp://host/x")
    res = cli("mount", "-c", str(node.config_path))
    assert res.returncode == 1
    assert "backup.url: backup URL ftp://host/x: unknown scheme 'ftp'" in res.stderr
    assert res.stderr.count("\n") == 1


def test_restore_if_empty_brings_back_every_database(node_factory, tmp_path: Path) -> None:
    """Every machine lost: a node with an empty data.dir restores before it serves."""
    url = f"file://{tmp_path}/backup"
    extra = "  restore-if-empty: true\n"
    primary = _backup_node(node_factory, url, extra=extra).start()
    expected = {}
    for name in ("a.db", "b.db"):
        conn = connect(primary.db(name), "wal" if name == "a.db" else "delete")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (?)", (name,))
        conn.close()
        wait_backed_up(primary, name)
        expected[name] = (primary.pos(name), dump(primary, name))
    primary.stop()
    import shutil

    shutil.rmtree(primary.data)
    primary.start()
    for name, (pos, rows) in expected.items():
        assert primary.pos(name) == pos  # the same TXID and checksum: history continues
        assert dump(primary, name) == rows
    assert "restored database from the backup" in primary.log()
    # It goes on committing and backing up from there.
    conn = connect(primary.db("a.db"))
    conn.execute("INSERT INTO t VALUES ('after')")
    conn.close()
    wait_backed_up(primary, "a.db")
    out = tmp_path / "a.db"
    assert cli("restore", "--url", url, "--db", "a.db", "-o", str(out)).returncode == 0
    assert _dump_file(out) == dump(primary, "a.db")


def test_replica_never_uploads_and_local_retention_keeps_what_is_not_uploaded(
    node_factory, tmp_path: Path
) -> None:
    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url).start()
    replica = replica_of(
        node_factory,
        primary,
        config_extra=(f"backup:\n  url: {json.dumps(url)}\n  sync-interval: 200ms\n"),
    ).start()
    _history(primary, "delete", 3)
    wait_same_pos(primary, [replica], "app.db")
    wait_backed_up(primary, "app.db")
    rep = status(replica)["backup"]
    assert rep["uploading"] is False and rep["objects_uploaded"] == 0
    epochs = {p.name for p in (tmp_path / "backup" / "app.db" / "epochs").iterdir()}
    assert len(epochs) == 1  # only the primary wrote


# ------------------------------------------------------------------ S3


def test_s3_backup_survives_a_store_outage(
    node_factory,
    tmp_path: Path,
    s3_server: SeaweedServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = s3_server.url("cluster1")
    env = s3_server.env
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the node inherits the credentials
    primary = _backup_node(node_factory, url)
    primary.start()
    _history(primary, "wal", 3)
    wait_backed_up(primary, "app.db")
    # The store stops answering for 30 s; commits go on all along and wait locally.
    s3_server.pause()
    outage_ends = time.monotonic() + 30
    conn = connect(primary.db("app.db"))
    for i in range(20):
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"during outage {i}",))
        time.sleep(1.4)
    conn.close()
    during = dump(primary, "app.db")
    time.sleep(max(0.0, outage_ends - time.monotonic()))
    rep = status(primary)["backup"]["databases"][0]
    assert rep["lag_txids"] >= 20
    assert rep["last_error"], rep  # the failing uploads are shown, in one line
    s3_server.resume()
    wait_backed_up(primary, "app.db", timeout=90)
    out = tmp_path / "r.db"
    res = cli("restore", "--url", url, "--db", "app.db", "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert _dump_file(out) == during


def test_compacted_objects_restore_the_same_states(node_factory, tmp_path: Path) -> None:
    """l0 objects merged into l1 (as the primary does every 5 minutes): restores use
    the merged object, give the same content, and every l0 point stays restorable."""
    import trio

    from litefspy.backup.target import Target
    from litefspy.backup.uploader import Uploader
    from litefspy.config import parse_target
    from litefspy.store.store import Store

    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url).start()
    states = _history(primary, "delete", 7)
    wait_backed_up(primary, "app.db")
    primary.stop()
    store = Store(tmp_path / "compactor")
    uploader = Uploader(store, Target(parse_target(url)), epoch=lambda: 1)
    piece = trio.run(uploader.compact, "app.db", "l1")
    assert piece is not None and piece.level == "l1"
    assert piece.max_txid == states[-1][0]
    assert trio.run(uploader.compact, "app.db", "l1") is None  # nothing left to merge
    store.close()
    out = tmp_path / "r.db"
    res = cli("restore", "--url", url, "--db", "app.db", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "from 2 objects" in res.stdout  # the snapshot and the l1 object
    assert _dump_file(out) == states[-1][2]
    for txid, _, expected in states[2:-1]:
        assert restore(url, out, "--txid", f"{txid:x}") == expected


def test_failover_continues_the_backup_and_a_lost_cluster_comes_back(
    node_factory,
    tmp_path: Path,
    etcd_shared,
    s3_server: SeaweedServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three nodes on etcd backing up to S3: kill -9 the primary under writes; the new
    primary continues the same backup (every write acknowledged more than
    sync-interval + 1 s before the kill is restorable); then every data.dir is
    wiped and the cluster comes back from the backup (restore-if-empty)."""
    import shutil
    import uuid

    from tests.support.cluster import Writer, etcd_node, first_writable, role, values, wait_role

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    url = s3_server.url("failover")
    backup = (
        f"backup:\n  url: {json.dumps(url)}\n  sync-interval: 200ms\n  restore-if-empty: true\n"
    )
    key = f"backup/{uuid.uuid4().hex}/primary"
    nodes = [
        etcd_node(node_factory, etcd_shared.url, key, name, config_extra=backup)
        for name in ("a", "b", "c")
    ]
    nodes[0].start()
    wait_role(nodes[0], "primary")
    for n in nodes[1:]:
        n.start()
    conn = connect(nodes[0].db("app.db"), "wal")
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    conn.close()
    # The writer is a process of its own: the kill aborts the mount under it
    # (its -shm mapping then raises SIGBUS, which must not hit the test runner).
    writer = subprocess.Popen(
        [sys.executable, "-c", ACK_WRITER, str(nodes[0].db("app.db"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: nodes[0].pos("app.db")[0] > 200, 30, what="writes on the first primary")
    killed_at = time.monotonic()
    nodes[0].kill()
    out, _ = writer.communicate(timeout=60)
    acked = [line.split() for line in out.splitlines() if line.strip()]
    assert len(acked) >= 150
    must_have = {int(v) for v, at in acked if float(at) < killed_at - 1.2}
    survivors = nodes[1:]
    primary = first_writable(survivors, "app.db", 100_000, 30)
    with Writer(primary.db("app.db"), start=200_000) as writer2:
        wait_for(lambda: len(writer2.acked) >= 50, 30, what="writes on the new primary")
    wait_backed_up(primary, "app.db", timeout=60)
    out = tmp_path / "latest.db"
    res = cli("restore", "--url", url, "--db", "app.db", "-o", str(out), env=s3_server.env)
    assert res.returncode == 0, res.stderr
    conn = sqlite3.connect(out)
    restored = {r[0] for r in conn.execute("SELECT x FROM t")}
    conn.close()
    assert must_have <= restored
    assert set(writer2.acked) <= restored
    assert restored == set(values(primary, "app.db"))
    # Both epochs' markers are there; the backup has one history.
    listing = json.loads(cli("backup", "list", "--url", url, "--json", env=s3_server.env).stdout)
    assert listing[0]["newest"]["txid"] == f"{primary.pos('app.db')[0]:016x}"

    # Every machine is lost: the cluster comes back from the backup.
    expected = dump(primary, "app.db")
    for n in nodes:
        n.stop()
        shutil.rmtree(n.data, ignore_errors=True)
    for n in nodes:
        n.start()
    back = first_writable(nodes, "app.db", 300_000, 30)
    others = [n for n in nodes if n is not back]
    for n in others:
        wait_role(n, "replica")
    conn = connect(back.db("app.db"))
    conn.execute("DELETE FROM t WHERE x = 300000")
    conn.close()
    wait_same_pos(back, others, "app.db")
    for n in nodes:
        assert dump(n, "app.db") == expected, n.name
        assert role(n) in ("primary", "replica")


def test_backup_in_status_table_and_metrics(node_factory, tmp_path: Path) -> None:
    import httpx

    from tests.support.nodes import free_port

    port = free_port()
    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url, extra=f"metrics:\n  addr: 127.0.0.1:{port}\n").start()
    _history(primary, "wal", 3)
    wait_backed_up(primary, "app.db")
    txid = primary.pos("app.db")[0]
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert f'litefspy_backup_uploaded_txid{{db="app.db"}} {float(txid)}' in body
    assert 'litefspy_backup_lag_txids{db="app.db"} 0.0' in body
    assert "litefspy_backup_objects_uploaded_total" in body
    table = cli("status", "--url", primary.url)
    assert table.returncode == 0, table.stderr
    assert f"backup:   file://{tmp_path}/backup" in table.stdout
    assert f"app.db    {txid:016x}  0" in table.stdout


def test_a_deleted_database_stays_deleted_in_the_backup(node_factory, tmp_path: Path) -> None:
    """Restore after the deletion: one line; before it: the data; restore-if-empty: not back."""
    url = f"file://{tmp_path}/backup"
    primary = _backup_node(node_factory, url, extra="  restore-if-empty: true\n").start()
    for name in ("keep.db", "gone.db"):
        conn = connect(primary.db(name), "delete")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (?)", (name,))
        conn.close()
    wait_backed_up(primary, "gone.db")
    before, before_ms = dump(primary, "gone.db"), int(time.time() * 1000)
    before_txid = primary.pos("gone.db")[0]
    deleted_txid = before_txid + 1  # the deletion is a transaction of its own
    time.sleep(0.3)
    os.unlink(primary.db("gone.db"))
    wait_backed_up(primary, "gone.db", txid=deleted_txid)
    listing = cli("backup", "list", "--url", url, "--db", "gone.db", "--json")
    assert listing.returncode == 0, listing.stderr
    (entry,) = json.loads(listing.stdout)
    assert entry["deleted"]["txid"] == f"{deleted_txid:016x}"
    table = cli("backup", "list", "--url", url)
    assert f"gone.db: deleted at {entry['deleted']['time']} (TXID {deleted_txid:016x})" in (
        table.stdout
    )
    assert "keep.db: TXID" in table.stdout
    out = tmp_path / "gone.db"
    res = cli("restore", "--url", url, "--db", "gone.db", "-o", str(out))
    assert res.returncode == 1 and not out.exists()
    assert res.stderr.strip() == (
        f"litefspy: gone.db was deleted at {entry['deleted']['time']} (TXID {deleted_txid:016x}); "
        "restore an earlier point with --timestamp or --txid"
    )
    # Any point before the deletion restores as it was.
    assert restore(url, out, "--timestamp", _iso(before_ms), db="gone.db") == before
    assert restore(url, out, "--txid", f"{before_txid:x}", db="gone.db") == before
    # Every machine lost: the node comes back with keep.db only.
    primary.stop()
    import shutil

    shutil.rmtree(primary.data)
    primary.start()
    assert dump(primary, "keep.db")
    assert not primary.db("gone.db").exists()
    assert "database was deleted; not restored" in primary.log()
    # Made anew under the same name: the backup follows the new database.
    conn = connect(primary.db("gone.db"), "wal")
    conn.execute("CREATE TABLE again (y)")
    conn.execute("INSERT INTO again VALUES ('new')")
    conn.close()
    wait_backed_up(primary, "gone.db")
    assert restore(url, out, db="gone.db") == dump(primary, "gone.db")


def test_backup_events_in_the_event_stream(node_factory, tmp_path: Path) -> None:
    """`litefspy events` on the primary: one `backup` per upload, and upload errors."""
    from tests.cluster.test_events_nodes import Events

    root = tmp_path / "backup"
    primary = _backup_node(node_factory, f"file://{root}").start()
    events = Events(primary.url)

    def next_backup() -> dict[str, Any]:
        while (event := events.next())["type"] != "backup":
            pass
        return event

    try:
        assert events.next()["type"] == "init"  # subscribed: what follows is seen
        conn = connect(primary.db("app.db"), "delete")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        txid = primary.pos("app.db")[0]
        up = next_backup()
        while up["data"]["txID"] < f"{txid:016x}":
            up = next_backup()
        data = up["data"]
        assert up["db"] == "app.db" and data["txID"] == f"{txid:016x}"
        assert data["level"] in ("l0", "snapshots") and data["lagTxIDs"] == 0
        assert (root / data["key"]).stat().st_size == data["bytes"] > 0
        assert data["uploaded"] >= data["committed"] and 0 <= data["rpoMs"] < 30_000
        assert data["deleted"] is False and "error" not in data
        # The store fails (a file where its level-0 folder goes): an error event.
        assert not (root / "app.db" / "l0").exists()  # the first upload is a snapshot
        (root / "app.db" / "l0").write_text("not a folder")
        conn.execute("INSERT INTO t VALUES (2)")
        failed = next_backup()
        assert failed["data"]["txID"] == f"{txid:016x}"  # what the store has
        assert failed["data"]["lagTxIDs"] == 1
        assert f"backup store file://{root}" in failed["data"]["error"]
        assert "\n" not in failed["data"]["error"]
        # Back: the next upload catches up.
        (root / "app.db" / "l0").unlink()
        back = next_backup()
        assert back["data"]["txID"] == f"{txid + 1:016x}" and "error" not in back["data"]
        conn.close()
    finally:
        events.close()


@pytest.fixture
def block_port() -> Iterator[Callable[[int], Callable[[], None]]]:
    """Make a loopback TCP port unreachable (nftables: connections reset); undone after."""
    table = f"litefspy_backup_{uuid.uuid4().hex[:8]}"
    made: list[str] = []

    def unblock() -> None:
        while made:
            subprocess.run(["nft", "delete", "table", "inet", made.pop()], check=False)

    def block(port: int) -> Callable[[], None]:
        rules = (
            f"table inet {table} {{\n"
            "  chain out {\n"
            "    type filter hook output priority 0;\n"
            f"    ip daddr 127.0.0.1 tcp dport {port} reject with tcp reset\n"
            "  }\n"
            "}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
        made.append(table)
        return unblock

    try:
        yield block
    finally:
        unblock()


def test_s3_store_unreachable_under_writes_then_catches_up_without_a_gap(
    node_factory,
    tmp_path: Path,
    s3_server: SeaweedServer,  # noqa: F811
    block_port: Callable[[int], Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store's port cut off: commits go on, status and metrics say how far behind
    and why (one line); back: the backup catches up and restores to the primary's state."""
    import httpx

    from tests.support.nodes import free_port

    url = s3_server.url("partition")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    primary = _backup_node(node_factory, url, extra=f"metrics:\n  addr: 127.0.0.1:{port}\n").start()
    conn = connect(primary.db("app.db"), "wal")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    wait_backed_up(primary, "app.db")
    uploaded = primary.pos("app.db")[0]
    unblock = block_port(int(s3_server.endpoint.rsplit(":", 1)[1]))
    for i in range(40):  # the node keeps committing and serving
        conn.execute("INSERT INTO t (v) VALUES (?)", (f"cut off {i}",))
        time.sleep(0.02)

    def behind_with_error() -> dict[str, Any] | None:
        (d,) = status(primary)["backup"]["databases"]
        return d if d["last_error"] and d["lag_txids"] >= 40 else None

    wait_for(lambda: behind_with_error() is not None, 20, what="the backup error in status")
    d = behind_with_error()
    assert d is not None and d["uploaded_txid"] == f"{uploaded:016x}"
    assert d["last_error"].startswith(f"backup store {url.split('?')[0]}: ")
    assert "\n" not in d["last_error"] and d["lag_ms"] > 0
    table = cli("status", "--url", primary.url).stdout
    (row,) = [line for line in table.splitlines() if line.startswith("app.db ") and "ago" in line]
    assert f"{uploaded:016x}" in row and "backup store s3://" in row
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert f'litefspy_backup_uploaded_txid{{db="app.db"}} {float(uploaded)}' in body
    behind = re.search(r'^litefspy_backup_lag_txids\{db="app.db"\} (\S+)$', body, re.M)
    errors = re.search(r"^litefspy_backup_errors_total (\S+)$", body, re.M)
    assert behind and float(behind[1]) >= 40 and errors and float(errors[1]) >= 1
    # Reachable again: uploads resume by themselves, nothing is missing.
    unblock()
    conn.execute("INSERT INTO t (v) VALUES ('after')")
    wait_backed_up(primary, "app.db", timeout=30)
    (d,) = status(primary)["backup"]["databases"]
    assert not d["last_error"] and d["lag_txids"] == 0
    out = tmp_path / "r.db"
    assert restore(url, out) == dump(primary, "app.db")
    conn.close()
