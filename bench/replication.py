"""Replication benchmarks W5 and W6 (docs/BENCHMARKS.md), with real node processes.

W5, lag: a single-row INSERT commits on the primary; the time until a fresh
connection on the replica sees the row (polled in a tight loop), in DELETE and
WAL mode. p50 / p99 / max in milliseconds.

Write forwarding: single-row INSERTs by a command on the replica under
`litefspy run --with-halt-lock-on` (each commit applied by the primary before
it returns), against the same INSERTs on the primary's mount. p50 ms per
commit and the ratio forwarded / on the primary.

W6, fresh replica: a primary holds a large database (default 256 MiB;
`LITEFSPY_BENCH_REPL_MB` or `python -m bench.replication --size-mb N / --gib`
changes it) with a history longer than the replica could replay, so the
primary builds a snapshot on the fly; a new replica is started and timed until
its position equals the primary's. Seconds, and MB/s of database size.

Nodes run with strict-verify off and info-level logs, as in production.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
W5_COMMITS = 300
FORWARD_COMMITS = 200
# Runs under the halt lock: times single-row commits on the database given.
_TIMED_INSERTS = """
import sqlite3, statistics, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
times = []
for i in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    conn.execute("INSERT INTO t (v) VALUES ('x')")
    times.append((time.perf_counter() - t0) * 1000)
print(statistics.median(times))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One `litefspy mount` process."""

    def __init__(
        self, root: Path, name: str, primary: Node | None = None, *, metrics: bool = False
    ) -> None:
        self.root = root / name
        self.mnt = self.root / "mnt"
        self.data = self.root / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        if primary is None:
            lease = f"  candidate: true\n  advertise-url: {self.url}\n"
        else:
            lease = f"  candidate: false\n  advertise-url: {primary.url}\n"
        self.config = self.root / "fuse.yml"
        self.config.write_text(
            f"fuse:\n  dir: {self.mnt}\ndata:\n  dir: {self.data}\n"
            f"grpc:\n  addr: 127.0.0.1:{self.port}\n"
            f"lease:\n  type: static\n  hostname: {name}\n{lease}"
            "  reconnect-delay: 100ms\n"
        )
        self.metrics_port = _free_port() if metrics else None
        if self.metrics_port is not None:
            with self.config.open("a") as f:
                f.write(f"metrics:\n  addr: 127.0.0.1:{self.metrics_port}\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> None:
        with open(self.root / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "litefspy", "mount", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not (self.mnt / ".lag").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited; see {self.root / 'node.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node did not mount in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, check=False)

    def pos(self, name: str) -> str | None:
        try:
            return (self.mnt / f"{name}-pos").read_text().strip()
        except FileNotFoundError:
            return None


def _wait_pos(replica: Node, primary: Node, name: str, timeout: float = 600) -> None:
    target = primary.pos(name)
    deadline = time.monotonic() + timeout
    while replica.pos(name) != target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica did not reach {target}")
        time.sleep(0.005)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _lag(primary: Node, replica: Node, mode: str) -> list[float]:
    name = f"lag-{mode}.db"
    conn = sqlite3.connect(primary.mnt / name, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    _wait_pos(replica, primary, name)
    path = replica.mnt / name
    lags = []
    for i in range(1, W5_COMMITS + 1):
        conn.execute("INSERT INTO t VALUES (?, 'x')", (i,))
        t0 = time.perf_counter()
        while True:
            fresh = sqlite3.connect(path, timeout=30)
            try:
                seen = fresh.execute("SELECT max(i) FROM t").fetchone()[0] or 0
            finally:
                fresh.close()
            if seen >= i:
                break
        lags.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.002)
    conn.close()
    return lags


def _commit_p50(path: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _TIMED_INSERTS, str(path), str(FORWARD_COMMITS)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def _forwarding(primary: Node, replica: Node, mode: str) -> dict[str, Any]:
    name = f"fwd-{mode}.db"
    conn = sqlite3.connect(primary.mnt / name, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    conn.close()
    _wait_pos(replica, primary, name)
    direct = _commit_p50(primary.mnt / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "litefspy",
            "run",
            "--url",
            replica.url,
            "--with-halt-lock-on",
            name,
            "--",
            sys.executable,
            "-c",
            _TIMED_INSERTS,
            str(replica.mnt / name),
            str(FORWARD_COMMITS),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    forwarded = float(out.stdout)
    _wait_pos(replica, primary, name)
    return {
        "workload": f"Write forwarding (halt lock), {mode.upper()}",
        "figure": "p50 per commit",
        "value": round(forwarded, 2),
        "unit": "ms",
        "on_primary_ms": round(direct, 2),
        "ratio_to_primary": round(forwarded / direct, 2),
        "commits": FORWARD_COMMITS,
    }


def build_database(path: Path, size: int) -> None:
    """Rows of text and partly random blobs (LZ4 sees a realistic mix) up to `size` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, data BLOB)")
    while path.stat().st_size < size:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
            "INSERT INTO t (name, data) SELECT printf('row %d of the benchmark', i), "
            "randomblob(100) || zeroblob(300) FROM n"
        )
        conn.commit()
    conn.close()


def run(size_mb: int | None = None) -> list[dict[str, Any]]:
    """Measure W5, write forwarding and W6; return result rows."""
    size_mb = size_mb or int(os.environ.get("LITEFSPY_BENCH_REPL_MB", "256"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="litefspy-bench-repl-") as tmp:
        root = Path(tmp)
        primary = Node(root, "primary")
        replica = Node(root, "replica", primary)
        fresh: Node | None = None
        try:
            # A database placed in data.dir is adopted at startup (TXID 1).
            build_database(primary.data / "dbs" / "big.db" / "database", size_mb * MIB)
            db_bytes = (primary.data / "dbs" / "big.db" / "database").stat().st_size
            primary.start()
            replica.start()
            for mode in ("delete", "wal"):
                lags = _lag(primary, replica, mode)
                rows.append(
                    {
                        "workload": f"W5 replication lag, {mode.upper()}",
                        "figure": "p50",
                        "value": round(statistics.median(lags), 2),
                        "unit": "ms",
                        "p99": round(_percentile(lags, 0.99), 2),
                        "max": round(max(lags), 2),
                        "commits": len(lags),
                    }
                )
            for mode in ("delete", "wal"):
                rows.append(_forwarding(primary, replica, mode))
            _wait_pos(replica, primary, "big.db")
            # History longer than a fresh replica replays: it gets a snapshot built on the fly.
            conn = sqlite3.connect(primary.mnt / "big.db", isolation_level=None, timeout=30)
            for i in range(20):
                conn.execute("UPDATE t SET name = ? WHERE id = ?", (f"updated {i}", i + 1))
            conn.close()
            fresh = Node(root, "fresh", primary)
            t0 = time.perf_counter()
            fresh.start()
            mounted = time.perf_counter() - t0
            _wait_pos(fresh, primary, "big.db")
            secs = time.perf_counter() - t0
            rows.append(
                {
                    "workload": f"W6 fresh replica joins ({db_bytes / MIB:.0f} MiB database)",
                    "figure": "seconds until caught up",
                    "value": round(secs, 2),
                    "unit": "s",
                    "mb_per_s": round(db_bytes / 1e6 / secs, 1),
                    "mount_s": round(mounted, 2),
                }
            )
        finally:
            for node in (fresh, replica, primary):
                if node is not None:
                    node.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    parser.add_argument("--size-mb", type=int, help="W6 database size in MiB (default 256)")
    parser.add_argument("--gib", action="store_true", help="W6 with a 1 GiB database")
    args = parser.parse_args()
    for row in run(1024 if args.gib else args.size_mb):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
