"""Failover through a real etcd lease: several node processes, one key, TTL 2 s.

A primary killed with SIGKILL in the middle of a write workload is replaced by
another candidate within the TTL (plus a second); a non-candidate never takes
the lease; the killed node rejoins as a replica and converges, and whatever it
committed that never reached the new primary is kept aside, not lost.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid

from tests.support.cluster import (
    Writer,
    connect,
    dump,
    etcd_node,
    first_writable,
    role,
    status,
    try_insert,
    values,
    wait_role,
    wait_same_pos,
)
from tests.support.etcd_server import EtcdServer, etcd_shared_fixture  # noqa: F401
from tests.support.nodes import NodeProcess, wait_for

TTL = 2.0
DB = "app.db"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def aside_values(node: NodeProcess) -> set[int]:
    """Values in the databases a node set aside when its history diverged."""
    found: set[int] = set()
    for copy in (node.data / "dbs" / DB).glob("aside-*/database"):
        conn = sqlite3.connect(f"file:{copy}?mode=ro&immutable=1", uri=True)
        try:
            found |= {int(r[0]) for r in conn.execute("SELECT x FROM t")}
        finally:
            conn.close()
    return found


def test_kill_primary_during_writes_candidate_takes_over_old_node_rejoins(
    node_factory, etcd_shared: EtcdServer
) -> None:
    key = f"failover/{uuid.uuid4().hex}/primary"
    a = etcd_node(node_factory, etcd_shared.url, key, "a").start()
    wait_role(a, "primary")
    b = etcd_node(node_factory, etcd_shared.url, key, "b").start()
    c = etcd_node(node_factory, etcd_shared.url, key, "c", candidate=False).start()
    wait_role(b, "replica")
    wait_role(c, "replica")
    # Not WAL: the writer would mmap the -shm of a mount that dies (SIGBUS in the test).
    conn = connect(a.db(DB), "truncate")
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    conn.close()
    wait_same_pos(a, [b, c], DB)

    with Writer(a.db(DB)) as writer:
        wait_for(lambda: len(writer.acked) >= 100, 30, what="writes on the primary")
        killed_at = time.monotonic()
        a.kill()
    assert writer.acked, "the workload never wrote"

    # Only b may take over; c (candidate: false) must never.
    new = first_writable([b, c], DB, 1_000_000, TTL + 1.0)
    failover = time.monotonic() - killed_at
    assert new is b, f"{new.name} became primary"
    assert failover <= TTL + 1.0, failover
    assert role(b) == "primary"
    st = status(b)
    assert st["lease"]["type"] == "etcd"
    assert st["lease"]["holder"] == "b"
    assert 0 < st["lease"]["expires_in_ms"] <= TTL * 1000
    assert not try_insert(c.db(DB), 1_000_001)
    cs = status(c)
    assert cs["role"] == "replica"
    assert cs["candidate"] is False
    assert cs["lease"]["epoch"] == st["lease"]["epoch"]
    assert cs["lease"]["holder"] == "b"
    # `run --if-candidate` does nothing on c; `run --promote` is refused there.
    out = cli("run", "--url", c.url, "--if-candidate", "--", sys.executable, "-c", "print(1)")
    assert (out.returncode, out.stdout) == (0, ""), out.stderr
    out = cli("run", "--url", c.url, "--promote", "--", sys.executable, "-c", "print(1)")
    assert out.returncode == 1 and out.stdout == ""
    assert "lease.candidate is false" in out.stderr

    # The cluster goes on; the old primary restarts and rejoins as a replica.
    for i in range(20):
        assert try_insert(b.db(DB), 2_000_000 + i)
    a.start()
    wait_role(a, "replica")
    wait_same_pos(b, [a, c], DB)
    assert dump(a, DB) == dump(b, DB) == dump(c, DB)
    assert role(c) == "replica"

    # Every acknowledged write is either in the new history or kept aside on a.
    final = set(values(b, DB))
    missing = set(writer.acked) - final
    assert missing <= aside_values(a), sorted(missing)[:10]
    if missing:
        assert "LTX files were set aside" in a.log_path.read_text()
