"""W7, node start with a large database already on disk (docs/BENCHMARKS.md).

A database (default 1 GiB; `LITEFSPY_BENCH_STARTUP_MB` or `--size-mb N`
changes it) is placed in data.dir and adopted at the first start. Then:
seconds from `litefspy mount` until the mount is up (`litefspy status`
is checked to answer, untimed), after a clean stop (the page checksums saved at the stop are
trusted) and after SIGKILL (the startup check reads the whole database).
Python's own start (imports) is part of every figure.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20


def _build(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("CREATE TABLE t (x)")
    for _ in range(max(1, size // MIB)):
        conn.executemany("INSERT INTO t VALUES (randomblob(4000))", [()] * 256)
    conn.commit()
    conn.close()


class _Node:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data, self.mnt = root / "data", root / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.config = root / "fuse.yml"
        self.config.write_text(
            f"fuse:\n  dir: {self.mnt}\ndata:\n  dir: {self.data}\n"
            f"grpc:\n  addr: 127.0.0.1:{port}\n"
            "lease:\n  type: static\n  candidate: true\n  hostname: w7\n"
            f"  advertise-url: {self.url}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Seconds until the mount is up (then checks that `status` answers)."""
        t0 = time.perf_counter()
        with open(self.root / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "litefspy", "mount", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while not (self.mnt / ".lag").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited; see {self.root / 'node.log'}")
            time.sleep(0.01)
        took = time.perf_counter() - t0
        # Not timed: the CLI's own interpreter start would dominate the figure.
        subprocess.run(
            [sys.executable, "-m", "litefspy", "status", "--url", self.url],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return took

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(300)
            self.proc = None
        if sig == signal.SIGKILL:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(size_mb: int | None = None) -> list[dict[str, Any]]:
    """Measure W7; return result rows."""
    size_mb = size_mb or int(os.environ.get("LITEFSPY_BENCH_STARTUP_MB", "1024"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="litefspy-bench-w7-") as tmp:
        node = _Node(Path(tmp))
        _build(node.data / "dbs" / "big.db" / "database", size_mb * MIB)
        label = f"{size_mb} MiB database"
        try:
            node.start()  # adopts the file as TXID 1
            node.stop()
            clean = [0.0, 0.0]
            for i in range(2):
                clean[i] = node.start()
                node.stop()
            rows.append(
                {
                    "workload": f"W7 start after a clean stop ({label})",
                    "figure": "seconds until serving",
                    "value": round(min(clean), 2),
                    "unit": "s",
                    "max": round(max(clean), 2),
                }
            )
            node.start()
            node.stop(signal.SIGKILL)
            crashed = node.start()
            rows.append(
                {
                    "workload": f"W7 start after SIGKILL ({label}, full startup check)",
                    "figure": "seconds until serving",
                    "value": round(crashed, 2),
                    "unit": "s",
                }
            )
        finally:
            node.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--size-mb", type=int, help="database size in MiB (default 1024)")
    args = parser.parse_args()
    for row in run(args.size_mb):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
