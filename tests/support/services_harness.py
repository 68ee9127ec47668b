"""Shared helpers (no tests here) for the services' component tests.

`mounted_node` runs a real Store behind a real FUSE mount in this process, a
GRPCServer with the services' RPCs registered, and a `FakeNode` standing in
for node.py's `NodeView` (litefspy.cluster.view). The mount is served by this
process's trio loop, so every access to it goes through a worker thread or a
subprocess.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from litefspy import api
from litefspy.config import Config
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.metrics import ReplicationStats
from litefspy.rpc.errors import Code, RPCRefused
from litefspy.rpc.server import GRPCServer
from litefspy.store.store import Store
from tests.support.mounted import attach_store
from tests.support.nodes import free_port


def make_config(
    root: Path, hostname: str = "node-a", lease: dict[str, Any] | None = None, **extra: Any
) -> Config:
    """A config under `root`; `extra` are top-level fuse.yml keys (dashes and all)."""
    data: dict[str, Any] = {
        "fuse": {"dir": str(root / "mnt")},
        "data": {"dir": str(root / "data")},
        "grpc": {"addr": f"127.0.0.1:{free_port()}"},
        "lease": {"type": "static", "hostname": hostname, **(lease or {})},
        **extra,
    }
    return Config.from_dict(data)


class FakeNode:
    """A NodeView whose role and primary a test sets."""

    def __init__(self, config: Config, store: Any = None, ops: Any = None) -> None:
        self.config = config
        self.store = store
        self.ops = ops
        self.primary = True
        self.primary_host: str | None = config.lease.hostname
        self.lag = 0
        self.epoch = 1
        self.replicas = 0
        self.role_callbacks: list[Callable[[str], None]] = []

    def is_primary(self) -> bool:
        return self.primary

    def primary_hostname(self) -> str | None:
        return self.primary_host

    def primary_advertise_url(self) -> str | None:
        return None

    def lag_ms(self) -> int:
        return self.lag

    def backup_report(self) -> None:
        return None

    def lease_epoch(self) -> int:
        return self.epoch

    def stream_count(self) -> int:
        return self.replicas

    def replica_count(self) -> int:
        return self.replicas

    def on_backup_event(self, callback: Callable[[Any], None]) -> None:
        del callback  # no backup here

    def on_role_change(self, callback: Callable[[str], None]) -> None:
        self.role_callbacks.append(callback)

    def readiness(self) -> tuple[bool, str]:
        return (True, "")

    def replication_stats(self) -> ReplicationStats:
        return ReplicationStats()

    def set_role(self, primary: bool, primary_host: str | None) -> None:
        self.primary = primary
        self.primary_host = primary_host
        if self.store is not None:
            self.store.set_writable(primary)
        for callback in self.role_callbacks:
            callback("primary" if primary else "replica")


@dataclass
class Mounted:
    node: FakeNode
    store: Store
    mnt: Path
    url: str

    def db(self, name: str) -> Path:
        return self.mnt / name


async def _unused_stream(*_args: object) -> None:
    raise RPCRefused(Code.UNAVAILABLE, "not served in this test")


@asynccontextmanager
async def mounted_node(root: Path, **config_extra: Any) -> AsyncIterator[Mounted]:
    """A primary FakeNode over a real store and mount, its RPCs served on a free port."""
    config = make_config(root, **config_extra)
    store = Store(Path(config.data.dir), strict_verify=True)
    store.open()
    ops = Operations(store)
    node = FakeNode(config, store, ops)
    mnt = Path(config.fuse.dir)
    server = GRPCServer(
        config.grpc.listen_address, stream_handler=_unused_stream, status_handler=_unused_stream
    )
    api.register_rpcs(node, server)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(ops, mnt, task_status=task_status))
        await nursery.start(attach_store, store, mnt, ops)
        await nursery.start(server.serve)
        try:
            yield Mounted(node, store, mnt, f"http://{config.grpc.client_address}")
        finally:
            nursery.cancel_scope.cancel()


def run_sql(path: Path, sql: str, mode: str | None = None) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        if mode:
            conn.execute(f"PRAGMA journal_mode={mode}")
        conn.executescript(sql)
    finally:
        conn.close()


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        return list(conn.iterdump())
    finally:
        conn.close()


def make_db(path: Path, rows: int, *, mode: str = "delete") -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i}" * 10,) for i in range(rows)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=delete")
    conn.close()


def corrupt_db(path: Path) -> None:
    """A file with a valid header whose b-tree pages are smashed (integrity_check fails)."""
    make_db(path, 3000)
    raw = bytearray(path.read_bytes())
    for off in range(4096 * 3, 4096 * 6):
        raw[off] = 0xFF
    path.write_bytes(bytes(raw))


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `litefspy ARGS` without blocking the loop that serves the mount."""
    return await trio.run_process(
        [sys.executable, "-m", "litefspy", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
