"""Filesystem benchmarks W1-W4 (BENCHMARKS.md): raw directory vs the litefspy mount.

All three targets are measured in the same run: a plain directory ("raw"), a
litefspy primary with one replica attached ("primary"), and for W3 reads on that
replica ("replica"). Ratios are litefspy / raw for throughput and raw / litefspy
for time, so 1.0 means "as fast as no replication at all".

`LITEFSPY_BENCH_SECONDS` sets how long each W1/W3 run lasts (default 3).
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.replication import Node, _wait_pos

SECONDS = float(os.environ.get("LITEFSPY_BENCH_SECONDS", "3"))
W1_MODES = [("delete", "full"), ("delete", "normal"), ("wal", "full"), ("wal", "normal")]
W2_ROWS = 100_000
W2_TXNS = 10
ROW = "x" * 100


def _connect(path: Path, mode: str, sync: str = "full") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute(f"PRAGMA synchronous={sync}")
    return conn


def w1_insert_rate(directory: Path, mode: str, sync: str) -> float:
    """Single-row INSERTs, each its own transaction: transactions per second."""
    path = directory / f"w1-{mode}-{sync}.db"
    conn = _connect(path, mode, sync)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    n = 0
    deadline = time.perf_counter() + SECONDS
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        conn.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
        n += 1
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def w2_bulk(directory: Path, mode: str) -> tuple[float, float]:
    """(seconds for one 100k-row transaction, seconds to build ~110 MB in 10 of them)."""
    path = directory / f"w2-{mode}.db"
    conn = _connect(path, mode, "normal")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    rows = [(f"{i:08d}{ROW}",) for i in range(W2_ROWS)]
    times = []
    for _ in range(W2_TXNS):
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (v) VALUES (?)", rows)
        conn.execute("COMMIT")
        times.append(time.perf_counter() - t0)
    conn.close()
    return times[0], sum(times)


def w3_point_reads(path: Path) -> float:
    """Random point reads by rowid on a new connection: reads per second."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    top = conn.execute("SELECT max(id) FROM t").fetchone()[0]
    rng = random.Random(7)
    n = 0
    deadline = time.perf_counter() + SECONDS
    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(100):
            conn.execute("SELECT v FROM t WHERE id = ?", (rng.randint(1, top),)).fetchone()
        n += 100
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def w4_scan(path: Path, cold: bool) -> float:
    """Full-table scan: seconds."""
    if cold:
        _drop_caches()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    t0 = time.perf_counter()
    conn.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def _row(
    workload: str,
    figure: str,
    raw: float,
    value: float,
    unit: str,
    *,
    higher_is_better: bool,
    target: str = "primary",
) -> dict[str, Any]:
    ratio = value / raw if higher_is_better else raw / value
    return {
        "workload": workload,
        "figure": f"{figure} ({target})",
        "value": value,
        "unit": unit,
        "raw": round(raw, 3),
        "ratio": round(ratio, 3),
    }


def _peak_rss_kb(node: Node) -> int:
    if node.proc is None:
        return 0
    try:
        for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="litefspy-bench-fs-") as tmp:
        root = Path(tmp)
        raw = root / "raw"
        raw.mkdir()
        primary = Node(root, "primary")
        primary.start()
        replica = Node(root, "replica", primary)
        replica.start()
        try:
            for mode, sync in W1_MODES:
                r = w1_insert_rate(raw, mode, sync)
                p = w1_insert_rate(primary.mnt, mode, sync)
                rows.append(
                    _row("W1", f"insert txn/s {mode}/{sync}", r, p, "txn/s", higher_is_better=True)
                )
            for mode in ("delete", "wal"):
                r_one, r_all = w2_bulk(raw, mode)
                p_one, p_all = w2_bulk(primary.mnt, mode)
                rows.append(
                    _row("W2", f"bulk 100k rows {mode}", r_one, p_one, "s", higher_is_better=False)
                )
                rows.append(
                    _row("W2", f"build 110 MB {mode}", r_all, p_all, "s", higher_is_better=False)
                )
                name = f"w2-{mode}.db"
                _wait_pos(replica, primary, name)
                r3 = w3_point_reads(raw / name)
                targets: list[tuple[str, Callable[[], float]]] = [
                    ("primary", lambda n=name: w3_point_reads(primary.mnt / n)),
                    ("replica", lambda n=name: w3_point_reads(replica.mnt / n)),
                ]
                for target, fn in targets:
                    rows.append(
                        _row(
                            "W3",
                            f"point reads {mode}",
                            r3,
                            fn(),
                            "reads/s",
                            higher_is_better=True,
                            target=target,
                        )
                    )
                for cold in (True, False):
                    label = "cold" if cold else "warm"
                    r4 = w4_scan(raw / name, cold)
                    p4 = w4_scan(primary.mnt / name, cold)
                    rows.append(
                        _row("W4", f"scan {label} {mode}", r4, p4, "s", higher_is_better=False)
                    )
            rows.append(
                {
                    "workload": "RSS",
                    "figure": "primary peak RSS",
                    "value": _peak_rss_kb(primary) / 1024,
                    "unit": "MiB",
                }
            )
            rows.append(
                {
                    "workload": "RSS",
                    "figure": "replica peak RSS",
                    "value": _peak_rss_kb(replica) / 1024,
                    "unit": "MiB",
                }
            )
        finally:
            replica.stop()
            primary.stop()
    return rows


if __name__ == "__main__":
    from bench.__main__ import print_table

    print_table(run())
