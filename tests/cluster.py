"""Cluster helpers on top of tests/nodes.py: primaries, replicas, status, SQLite checks."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.nodes import NodeProcess, wait_for

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
