"""Replication under faults: a primary killed mid-transfer, a peer sending garbage,
a node pointed at itself. The replica must log clearly, never crash, and never
apply anything partial or invalid."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from litefspy.rpc.client import fetch_status
from litefspy.rpc.errors import RemoteError
from litefspy.v1 import replication_pb2 as pb
from tests.support.cluster import connect, dump, integrity, replica_lease, replica_of, wait_same_pos
from tests.support.nodes import NodeProcess, free_port, wait_for

MIB = 1 << 20


def build_big_database(path: Path, size: int) -> None:
    """A SQLite file of about `size` bytes of incompressible rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, v BLOB)")
    rows = size // 3000
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO blobs (v) SELECT randomblob(2900) FROM n",
        (rows,),
    )
    conn.commit()
    conn.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_primary_killed_mid_transfer_leaves_no_partial_apply(node_factory) -> None:
    primary = node_factory("primary")
    # A database placed in the data dir by hand is adopted as TXID 1 at startup.
    build_big_database(primary.data / "dbs" / "big.db" / "database", 160 * MIB)
    primary.start(timeout=120)
    expected = sha(primary.db("big.db"))
    replica = replica_of(node_factory, primary, "replica").start()

    def receiving() -> bool:
        try:
            stats = fetch_status(replica.url).replication
        except RemoteError:
            return False  # mounted, but its gRPC server is not listening yet
        return stats.bytes_received > 0

    wait_for(receiving, 60, interval=0.005, what="the transfer to start")
    primary.kill()
    time.sleep(0.5)
    stats = fetch_status(replica.url).replication
    assert replica.proc is not None and replica.proc.poll() is None
    assert stats.files_applied == 0, "the transfer finished before the kill: make it bigger"
    assert not stats.connected
    assert not replica.db("big.db").exists()
    assert list((replica.data / "tmp").glob("*")) == []
    assert "replication stream ended" in replica.log()

    primary.start(timeout=120)
    wait_same_pos(primary, [replica], "big.db", timeout=120)
    assert sha(replica.db("big.db")) == expected
    assert integrity(replica, "big.db") == "ok"


# ---------------------------------------------------------------- fake primary


def frame(**kwargs: object) -> bytes:
    return pb.StreamFrame(**kwargs).SerializeToString()  # type: ignore[arg-type]


def hello(node_id: int = 0x1234, cluster_id: str = "") -> bytes:
    return frame(hello=pb.Hello(node_id=node_id, hostname="fake", cluster_id=cluster_id, epoch=1))


def ltx(name: str, data: bytes, *, size: int | None = None, first: bool = True) -> bytes:
    chunk = pb.LTXChunk(
        name=name, data=data, first=first, last=True, size=len(data) if size is None else size
    )
    return frame(ltx=chunk)


class FakePrimary:
    """A gRPC server speaking Replication.Stream, sending scripted raw frames."""

    def __init__(self, scripts: list[list[bytes]]) -> None:
        self.scripts = scripts
        self.requests: list[pb.StreamRequest] = []
        self.port = free_port()
        self.served = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_stream_rpc_method_handler(
            self._stream,
            request_deserializer=pb.StreamRequest.FromString,
            response_serializer=lambda raw: raw,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("litefspy.v1.Replication", {"Stream": handler}),)
        )
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _stream(self, request: pb.StreamRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        self.requests.append(request)
        if not self.scripts:
            self.served.set()
            yield hello()
            while context.is_active():
                time.sleep(0.2)
                yield frame(heartbeat=pb.Heartbeat(unix_ms=0))
            return
        yield from self.scripts.pop(0)

    def __enter__(self) -> FakePrimary:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(None)


def corrupt(data: bytes) -> bytes:
    """Flip one byte in the middle of the page block."""
    i = 100 + (len(data) - 116) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def test_garbage_from_a_fake_peer_changes_nothing(node_factory) -> None:
    primary = node_factory("primary").start()
    replica = replica_of(node_factory, primary, "replica").start()
    conn = connect(primary.db("app.db"), "delete")
    conn.execute("CREATE TABLE t (x)")
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    wait_same_pos(primary, [replica], "app.db")
    replica.stop()
    conn.execute("INSERT INTO t VALUES (100)")
    conn.execute("INSERT INTO t VALUES (101)")
    conn.close()
    files = {int(p.name[:16], 16): p.read_bytes() for p in primary.ltx_files("app.db")}
    newest = max(files)
    next_file, after_next = files[newest - 1], files[newest]
    replica_id = int((replica.data / "id").read_text(), 16)

    scripts = [
        [b"\xff\xfe garbage that is no protobuf"],
        [ltx("app.db", next_file)],  # no Hello first
        [hello(node_id=replica_id)],  # itself
        [hello(), ltx("../../etc/passwd", next_file)],
        [hello(), ltx("app.db", b"LTX1" + os.urandom(300))],
        [hello(), ltx("app.db", corrupt(next_file))],
        [hello(), ltx("app.db", next_file[:-10], size=len(next_file))],  # torn
        [hello(), ltx("app.db", after_next)],  # does not continue the position
        [hello(), ltx("app.db", next_file[:50], first=False)],  # no first chunk
        # Finally a valid file: the replica applies it.
        [hello(), ltx("app.db", next_file), frame(ready=pb.Ready())],
    ]
    n_scripts = len(scripts)
    with FakePrimary(scripts) as fake:
        victim = node_factory("replica", lease=replica_lease(primary, "replica"))
        victim.config_path.write_text(victim.config_path.read_text().replace(primary.url, fake.url))
        primary.stop()
        victim.start()
        before = victim.pos("app.db")
        wait_for(fake.served.is_set, 60, what="every scripted stream to be served")
        wait_for(lambda: victim.pos("app.db")[0] == before[0] + 1, 20, what="the valid file")
        assert victim.proc is not None and victim.proc.poll() is None
        log = victim.log_path.read_text()
        assert "protocol error" in log
        assert "refusing to replicate from itself" in log
        assert "invalid database name '../../etc/passwd'" in log
        assert "cannot apply LTX from the primary; database unchanged" in log
        assert "Traceback" not in log
        assert len(fake.requests) >= n_scripts
        # After an apply failure, the replica asks for a snapshot (no position).
        asked = [{p.name for p in r.positions} for r in fake.requests]
        assert "app.db" in asked[0]
        assert "app.db" not in asked[5]  # the stream after the garbage LTX (script 4)
        assert "app.db" in asked[-1]  # applied fine again since
        stats = fetch_status(victim.url).replication
        assert stats.apply_errors >= 3
        assert integrity(victim, "app.db") == "ok"
        rows = [r for r in dump(victim, "app.db") if r.startswith("INSERT")]
        assert rows[-1] == 'INSERT INTO "t" VALUES(100);'
        assert not (victim.data / "etc").exists()
        assert list((victim.data / "tmp").glob("*")) == []


def test_a_node_never_replicates_from_itself(node_factory) -> None:
    node: NodeProcess = node_factory("selfish")
    node.config_path.write_text(
        node.config_path.read_text().replace("candidate: true", "candidate: false")
    )
    node.start()
    wait_for(lambda: "refuses to replicate from itself" in node.log(), 20, what="the refusal")
    assert not (node.mnt / ".primary").exists()
    assert node.proc is not None and node.proc.poll() is None
    node.stop(signal.SIGINT)


def test_offline_database_on_the_replica_repairs_itself_from_the_primary(node_factory) -> None:
    """The primary holds a good copy: the replica takes a snapshot, keeping its own aside."""
    primary = node_factory("primary").start()
    replica = replica_of(node_factory, primary, "replica").start()
    conns = {}
    for name in ("a.db", "b.db"):
        conns[name] = connect(primary.db(name), "delete")
        conns[name].execute("CREATE TABLE t (x)")
        wait_same_pos(primary, [replica], name)
    replica.stop()
    # The replica's newest LTX of a.db is damaged: its recovery takes a.db offline.
    newest = replica.ltx_files("a.db")[-1]
    newest.write_bytes(b"LTX1" + bytes(200))
    for conn in conns.values():
        conn.execute("INSERT INTO t VALUES (1)")
        conn.close()
    replica.start()

    def repaired() -> bool:
        try:
            return replica.pos("a.db") == primary.pos("a.db")
        except OSError:
            return False  # still offline (EIO) until the snapshot is applied

    wait_for(repaired, 30, what="a.db repaired on the replica")
    for name in ("a.db", "b.db"):
        wait_same_pos(primary, [replica], name)
        assert dump(replica, name) == dump(primary, name)
        assert integrity(replica, name) == "ok"
    log = replica.log_path.read_text()
    assert "database offline" in log
    assert "repairing offline database from a snapshot db=a.db" in log
    # What it had is kept aside, the damaged file included, for a person to look at.
    asides = list((replica.data / "dbs" / "a.db").glob("aside-*"))
    assert len(asides) == 1
    assert (asides[0] / newest.name).read_bytes() == b"LTX1" + bytes(200)
    assert (asides[0] / "database").exists()
    # Applications retrying an offline database do not flood the log.
    assert log.count("lookup of offline database") <= 1
