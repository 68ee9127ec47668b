"""LTX codec throughput: page checksums and snapshot encoding of a real database.

The database (default 256 MiB, LITEFSPY_BENCH_CODEC_MB overrides) is built with
stdlib sqlite3 in a temp dir: three tables of text-like rows and some random
blobs, so LZ4 sees a realistic mix rather than all zeros or all noise.  Files
are read warm (from the page cache): these figures are the codec's CPU cost,
not the disk's.  Each figure is the best of a few runs, to damp noise on
shared machines.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from litefspy.ltx.apply import apply_files, encode_database
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.decoder import verify_file

MIB = 1 << 20
REPEATS = 3

# Targets from the codec's brief (MB/s, decimal megabytes).
TARGET_CHECKSUM_MBS = 1000.0
TARGET_ENCODE_MBS = 300.0


def build_database(path: Path, size_bytes: int, page_size: int = 4096) -> None:
    """Fill a SQLite database with mixed rows until it reaches size_bytes."""
    con = sqlite3.connect(path)
    try:
        con.execute(f"PRAGMA page_size={page_size}")
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, email TEXT, bio TEXT)")
        con.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id INT, kind TEXT, payload TEXT)"
        )
        con.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
        con.execute("CREATE INDEX events_user ON events(user_id)")
        batch = 20_000
        start = 0
        while path.stat().st_size < size_bytes:
            con.execute(
                "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO users SELECT i, printf('user %d', i), printf('u%d@example.com', i), "
                "printf('bio of user %d: likes %s', i, hex(randomblob(12))) FROM n",
                (start, start + batch - 1),
            )
            con.execute(
                "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO events SELECT i, i % 997, "
                "CASE i % 3 WHEN 0 THEN 'click' WHEN 1 THEN 'view' ELSE 'purchase' END, "
                'printf(\'{"item": %d, "session": "%s", "note": "%s"}\', '
                "i * 7, hex(randomblob(8)), substr('lorem ipsum dolor sit amet ', 1 + i % 20)) "
                "FROM n",
                (start, start + batch - 1),
            )
            con.execute(
                "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                "INSERT INTO blobs SELECT i, randomblob(64) || zeroblob(64) FROM n",
                (start, start + batch // 4 - 1),
            )
            con.commit()
            start += batch
    finally:
        con.close()


def _best(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Shortest wall time of several runs, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _row(workload: str, figure: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {"workload": workload, "figure": figure, "value": round(value, 1), "unit": unit, **extra}


def run() -> list[dict[str, Any]]:
    """Measure and return result rows."""
    size = int(os.environ.get("LITEFSPY_BENCH_CODEC_MB", "256")) * MIB
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="litefspy-bench-codec-") as tmp:
        d = Path(tmp)
        db = d / "bench.db"
        t0 = time.perf_counter()
        build_database(db, size)
        build_s = time.perf_counter() - t0
        db_bytes = db.stat().st_size
        mb = db_bytes / 1e6

        def checksums() -> None:
            with open(db, "rb") as f:
                PageChecksums.from_file(f, 4096)

        checksums()  # warm the page cache
        secs = _best(checksums)
        rows.append(
            _row(
                "page checksums (PageChecksums.from_file)",
                "throughput",
                mb / secs,
                "MB/s",
                target=TARGET_CHECKSUM_MBS,
                db_mb=round(mb, 1),
                build_s=round(build_s, 1),
            )
        )
        for compress in (False, True):
            out = d / ("snap-lz4.ltx" if compress else "snap.ltx")
            secs = _best(lambda c=compress, o=out: encode_database(db, o, compress=c))
            label = "compressed" if compress else "uncompressed"
            rows.append(
                _row(
                    f"encode-db snapshot, {label}",
                    "throughput",
                    mb / secs,
                    "MB/s",
                    target=TARGET_ENCODE_MBS,
                    ltx_mb=round(out.stat().st_size / 1e6, 1),
                )
            )
            secs = _best(lambda o=out: verify_file(o))
            rows.append(_row(f"verify snapshot, {label}", "throughput", mb / secs, "MB/s"))
            target = d / "restored.db"

            def restore(o: Path = out, t: Path = target) -> None:
                t.unlink(missing_ok=True)
                apply_files(t, [o])

            secs = _best(restore)
            rows.append(_row(f"apply snapshot to new db, {label}", "throughput", mb / secs, "MB/s"))
            if target.read_bytes() != db.read_bytes():
                raise AssertionError("restored database differs from the original")
    return rows
