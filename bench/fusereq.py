"""FUSE requests per commit and per 1000 point reads on the primary (issue 13, items 4 and 6).

Counts, not times: the number of FUSE requests a workload makes does not depend
on how loaded the machine is, so these rows compare runs on a busy machine too.
They come from the node's own counters (`litefspy_fuse_requests_total` on its
metrics endpoint), read before and after each workload, so every request the
primary answers is in them (the lock keeper's included).

* W1: single-row INSERTs, each its own transaction, in DELETE/FULL,
  DELETE/NORMAL, WAL/FULL and WAL/NORMAL: requests per commit, by operation.
* W3: a committed row, then (a second later, as an application reading a
  database written a moment ago) a new read-only connection making 1000
  random point reads: FUSE read requests per 1000 reads, DELETE and WAL, on
  the primary and on the replica once it applied the commit. The database is
  larger than SQLite's own cache, so reads reach the kernel; the kernel's page
  cache answers them unless it was dropped. On each node the database stays
  open meanwhile (the writer on the primary, a connection on the replica), as
  in an application with a connection pool.

`python -m bench --only fusereq` runs only this (about 30 s).
`LITEFSPY_BENCH_FUSEREQ_COMMITS` (default 200) sets the commits per W1 mode.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.replication import Node, _wait_pos

COMMITS = int(os.environ.get("LITEFSPY_BENCH_FUSEREQ_COMMITS", "200"))
WARMUP = 20
W1_MODES = [("delete", "full"), ("delete", "normal"), ("wal", "full"), ("wal", "normal")]
W3_ROWS = 40_000  # ~5 MB: larger than SQLite's 2 MB page cache
W3_READS = 1000
W3_ROUNDS = 3
ROW = "x" * 100


def fuse_requests(node: Node) -> dict[str, int]:
    """The node's FUSE request counters by operation, from its metrics endpoint."""
    assert node.metrics_port is not None, "start the node with metrics=True"
    text = httpx.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).text
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "litefspy_fuse_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["op"]] = int(sample.value)
    return counts


def counted(node: Node, work: Callable[[], None]) -> dict[str, int]:
    """FUSE requests the node answered while `work` ran, by operation."""
    before = fuse_requests(node)
    work()
    after = fuse_requests(node)
    return {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}


def _connect(path: Path, mode: str, sync: str = "full") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute(f"PRAGMA synchronous={sync}")
    return conn


def per_commit(node: Node, mode: str, sync: str, commits: int = COMMITS) -> dict[str, float]:
    """FUSE requests per single-row commit on `node`, by operation."""
    conn = _connect(node.mnt / f"req-{mode}-{sync}.db", mode, sync)
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        for _ in range(WARMUP):
            conn.execute("INSERT INTO t (v) VALUES (?)", (ROW,))

        def work() -> None:
            for _ in range(commits):
                conn.execute("INSERT INTO t (v) VALUES (?)", (ROW,))

        seen = counted(node, work)
    finally:
        conn.close()
    return {op: n / commits for op, n in sorted(seen.items())}


def reads_after_commit(node: Node, mode: str, replica: Node) -> dict[str, dict[str, float]]:
    """FUSE requests per 1000 point reads by a new connection, a second after a commit,
    on `node` (the primary) and on `replica`."""
    name = f"reads-{mode}.db"
    writer = _connect(node.mnt / name, mode, "normal")
    rng = random.Random(7)
    totals: dict[str, dict[str, int]] = {"primary": {}, "replica": {}}
    holder: sqlite3.Connection | None = None
    try:
        writer.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        writer.execute("BEGIN")
        writer.executemany(
            "INSERT INTO t (v) VALUES (?)", ((f"{i:08d}{ROW}",) for i in range(W3_ROWS))
        )
        writer.execute("COMMIT")
        _wait_pos(replica, node, name)
        holder = sqlite3.connect(f"file:{replica.mnt / name}?mode=ro", uri=True, timeout=60)
        # Every page read once on each node: what stays cached is what is measured.
        for conn in (writer, holder):
            conn.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
        for _ in range(W3_ROUNDS):
            writer.execute("UPDATE t SET v = ? WHERE id = ?", (ROW, rng.randint(1, W3_ROWS)))
            _wait_pos(replica, node, name)
            # Past the next whole second: what an application sees reading a
            # database written a moment ago (and what a whole-second mtime hides
            # when the reads follow at once).
            time.sleep(1.1)
            for target, where in (("primary", node), ("replica", replica)):

                def read(path: Path = where.mnt / name) -> None:
                    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
                    try:
                        for _ in range(W3_READS):
                            reader.execute(
                                "SELECT v FROM t WHERE id = ?", (rng.randint(1, W3_ROWS),)
                            ).fetchone()
                    finally:
                        reader.close()

                for op, n in counted(where, read).items():
                    totals[target][op] = totals[target].get(op, 0) + n
    finally:
        if holder is not None:
            holder.close()
        writer.close()
    return {
        target: {op: n / W3_ROUNDS * 1000 / W3_READS for op, n in sorted(ops.items())}
        for target, ops in totals.items()
    }


def _ops(counts: dict[str, float]) -> dict[str, float]:
    return {op: round(n, 2) for op, n in counts.items() if n >= 0.005}


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="litefspy-bench-fusereq-") as tmp:
        root = Path(tmp)
        primary = Node(root, "primary", metrics=True)
        primary.start()
        replica = Node(root, "replica", primary, metrics=True)
        replica.start()
        try:
            for mode, sync in W1_MODES:
                per_op = per_commit(primary, mode, sync)
                rows.append(
                    {
                        "workload": "W1",
                        "figure": f"FUSE requests per commit {mode}/{sync} (primary)",
                        "value": round(sum(per_op.values()), 2),
                        "unit": "requests",
                        **_ops(per_op),
                    }
                )
            for mode in ("delete", "wal"):
                for target, per_op in reads_after_commit(primary, mode, replica).items():
                    rows.append(
                        {
                            "workload": "W3",
                            "figure": f"FUSE reads per {W3_READS} point reads {mode} ({target})",
                            "value": round(per_op.get("read", 0.0), 1),
                            "unit": "requests",
                            "all": round(sum(per_op.values()), 1),
                            **_ops(per_op),
                        }
                    )
        finally:
            replica.stop()
            primary.stop()
    return rows


if __name__ == "__main__":
    from bench.__main__ import print_table

    print_table(run())
