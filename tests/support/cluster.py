"""Cluster helpers on top of tests/nodes.py: primaries, replicas, status, SQLite checks."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.nodes import NodeProcess, wait_for

MODES = ["delete", "truncate", "persist", "wal"]


def replica_lease(primary: NodeProcess, name: str, reconnect_delay: str = "100ms") -> str:
    """A static-lease replica config section pointing at `primary`."""
    return (
        "lease:\n  type: static\n  candidate: false\n"
        f"  hostname: {name}\n  advertise-url: {primary.url}\n"
        f"  reconnect-delay: {reconnect_delay}\n"
    )


def replica_of(
    node_factory: Any, primary: NodeProcess, name: str = "replica", **kwargs: Any
) -> NodeProcess:
    """A (not yet started) replica node of `primary`."""
    return node_factory(name, lease=replica_lease(primary, name), **kwargs)


def status(node: NodeProcess, *extra: str) -> dict[str, Any]:
    """`litefspy status --json --url NODE` parsed."""
    out = subprocess.run(
        [sys.executable, "-m", "litefspy", "status", "--json", "--url", node.url, *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def try_pos(node: NodeProcess, name: str) -> tuple[int, int] | None:
    try:
        return node.pos(name)
    except (FileNotFoundError, ValueError):
        return None


def wait_same_pos(
    primary: NodeProcess, replicas: list[NodeProcess], name: str, timeout: float = 30
):
    """Wait until every replica has the primary's position of `name`; return it."""
    target = primary.pos(name)

    def same() -> bool:
        return all(try_pos(r, name) == target for r in replicas)

    try:
        wait_for(same, timeout, what=f"{name} at {target} on replicas")
    except TimeoutError:
        seen = {r.name: try_pos(r, name) for r in replicas}
        logs = "\n".join(f"--- {r.name}\n{r.log()[-3000:]}" for r in replicas)
        raise AssertionError(f"replicas did not reach {target}: {seen}\n{logs}") from None
    return target


def connect(path: Path, mode: str | None = None, **pragmas: object) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    if mode is not None:
        conn.execute(f"PRAGMA journal_mode={mode}")
    for key, value in pragmas.items():
        conn.execute(f"PRAGMA {key}={value}")
    return conn


def dump(node: NodeProcess, name: str) -> list[str]:
    conn = sqlite3.connect(f"file:{node.db(name)}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        return list(conn.iterdump())
    finally:
        conn.close()


def integrity(node: NodeProcess, name: str) -> str:
    conn = sqlite3.connect(f"file:{node.db(name)}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# ------------------------------------------------------------------ etcd leases


def etcd_lease(
    endpoint: str,
    key: str,
    name: str,
    *,
    candidate: bool = True,
    ttl: str = "2s",
    promote: bool = False,
    demote_delay: str = "1s",
    reconnect_delay: str = "100ms",
    advertise_url: str = "__ADVERTISE_URL__",
) -> str:
    """An etcd lease config section; `etcd_node` fills in the node's own URL."""
    return (
        "lease:\n  type: etcd\n"
        f"  hostname: {name}\n  advertise-url: {advertise_url}\n"
        f"  candidate: {str(candidate).lower()}\n  promote: {str(promote).lower()}\n"
        f"  reconnect-delay: {reconnect_delay}\n  demote-delay: {demote_delay}\n"
        f"  etcd:\n    endpoints: [{endpoint}]\n    key: {key}\n    ttl: {ttl}\n"
    )


def etcd_node(node_factory: Any, endpoint: str, key: str, name: str, **kwargs: Any) -> NodeProcess:
    """A (not yet started) node electing through etcd at `endpoint` on `key`."""
    config_extra = kwargs.pop("config_extra", "")
    node: NodeProcess = node_factory(
        name, lease=etcd_lease(endpoint, key, name, **kwargs), config_extra=config_extra
    )
    node.config_path.write_text(node.config_path.read_text().replace("__ADVERTISE_URL__", node.url))
    return node


def try_status(node: NodeProcess) -> dict[str, Any] | None:
    """`status` of `node`, None if it does not answer."""
    from litefspy.errors import LitefspyError
    from litefspy.rpc.client import fetch_status
    from litefspy.rpc.convert import status_to_dict

    try:
        return status_to_dict(fetch_status(node.url, timeout=2))
    except LitefspyError:
        return None


def role(node: NodeProcess) -> str | None:
    """The node's role, None if it does not answer."""
    st = try_status(node)
    return None if st is None else str(st["role"])


def wait_role(node: NodeProcess, expected: str, timeout: float = 20) -> None:
    """Wait until `node` reports `expected` as its role."""
    try:
        wait_for(lambda: role(node) == expected, timeout, interval=0.05, what=f"{node.name} role")
    except TimeoutError:
        raise AssertionError(
            f"{node.name} is {role(node)!r}, not {expected!r}:\n{node.log()[-4000:]}"
        ) from None


def try_insert(path: Path, value: int, busy_ms: int = 200) -> bool:
    """Insert `value` into `t` in its own transaction through a fresh connection."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_ms / 1000)
    except sqlite3.Error:
        return False
    try:
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        conn.execute("INSERT INTO t VALUES (?)", (value,))
        return True
    except (sqlite3.Error, OSError):
        return False
    finally:
        conn.close()


def values(node: NodeProcess, name: str) -> list[int]:
    """Every value of `t` in `name` on `node`, sorted."""
    conn = sqlite3.connect(f"file:{node.db(name)}?mode=ro", uri=True, timeout=30)
    try:
        return sorted(int(r[0]) for r in conn.execute("SELECT x FROM t"))
    finally:
        conn.close()


class Writer:
    """Inserts 1, 2, 3... into `t`, one transaction each, until stopped or refused."""

    def __init__(self, path: Path, start: int = 1) -> None:
        self.path = path
        self.next = start
        self.acked: list[int] = []
        self.last_ok = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not try_insert(self.path, self.next):
                return
            self.acked.append(self.next)
            self.last_ok = time.monotonic()
            self.next += 1
            time.sleep(0.002)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def first_writable(nodes: list[NodeProcess], name: str, value: int, timeout: float) -> NodeProcess:
    """Poll inserts of `value` on every node until one accepts; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if try_insert(node.db(name), value, busy_ms=50):
                return node
        time.sleep(0.01)
    logs = "\n".join(f"--- {n.name}\n{n.log()[-3000:]}" for n in nodes)
    raise AssertionError(f"no node accepted a write within {timeout}s\n{logs}")
