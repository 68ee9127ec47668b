"""Failover benchmark W8 (docs/BENCHMARKS.md), with real node processes and a real etcd.

Three nodes (all candidates) elect through a private etcd on 127.0.0.1 with a
lease TTL of 2 s (`LITEFSPY_BENCH_TTL` changes it).

* kill: a writer commits on the primary in a loop; the primary gets SIGKILL;
  the time until another node accepts a write (probed every few ms), over
  several rounds (the killed node restarts and rejoins in between). Target:
  at most TTL + 0.5 s.
* handoff: one writer per node commits in a tight loop (a fresh connection
  each time, as a replica's read-only connection never becomes writable);
  `Admin.Promote` (what `litefspy run --promote` calls) moves the lease to
  another node. Write unavailability = first commit on the new primary minus
  the last commit on the old one, as the writers saw it. Target: at most 50 ms.

Nodes run with strict-verify off and info-level logs, as in production.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

KILL_ROUNDS = 3
HANDOFF_ROUNDS = 6
DB = "bench.db"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Etcd:
    """A private single-member etcd on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.command = [
            "etcd",
            "--name=bench",
            f"--data-dir={root / 'etcd'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            "--log-level=error",
            "--logger=zap",
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]
        self.log = root / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, env=env)
        import urllib.request

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"etcd did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Node:
    """One `litefspy mount` process electing through etcd."""

    def __init__(self, root: Path, name: str, etcd: Etcd, key: str, ttl: float) -> None:
        self.name = name
        self.root = root / name
        self.mnt = self.root / "mnt"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "fuse.yml"
        self.config.write_text(
            f"fuse:\n  dir: {self.mnt}\ndata:\n  dir: {self.root / 'data'}\n"
            f"grpc:\n  addr: 127.0.0.1:{self.port}\n"
            f"lease:\n  type: etcd\n  hostname: {name}\n  advertise-url: {self.url}\n"
            "  reconnect-delay: 100ms\n  demote-delay: 1s\n"
            f"  etcd:\n    endpoints: [{etcd.url}]\n    key: {key}\n    ttl: {ttl:g}s\n"
        )

    def start(self) -> None:
        with open(self.root / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "litefspy", "mount", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if (self.mnt / ".lag").exists():
                    return
            except OSError:
                pass  # a dead mount of the killed process, not cleaned up yet
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited; see {self.root / 'node.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError("node did not mount")
            time.sleep(0.02)

    def role(self) -> str | None:
        from litefspy.errors import LitefspyError
        from litefspy.rpc.client import fetch_status

        try:
            return fetch_status(self.url, timeout=2).role
        except LitefspyError:
            return None

    def wait_role(self, role: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.role() != role:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} is not {role}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.reap()

    def reap(self) -> bool:
        """Wait for the (killed) process to exit; True if it was stuck in its own mount.

        A node killed while it holds a descriptor opened through its own mount
        can hang in exit: the kernel sends FUSE_FLUSH for it to the dying
        daemon itself. The connection is then aborted through fusectl.
        """
        stuck = False
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                stuck = True
                self._abort_fuse_connection()
                self.proc.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, check=False)
        return stuck

    def _abort_fuse_connection(self) -> None:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(self.mnt):
                minor = fields[2].split(":")[1]
                Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
                return


_values = itertools.count(1)


def _insert(path: Path, busy_ms: int = 100) -> bool:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_ms / 1000)
    except sqlite3.Error:
        return False
    try:
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        conn.execute("INSERT INTO t VALUES (?)", (next(_values),))
        return True
    except (sqlite3.Error, OSError):
        return False
    finally:
        conn.close()


class Committer:
    """Commits on one node in a loop; records when each commit returned."""

    def __init__(self, node: Node) -> None:
        self.path = node.mnt / DB
        self.ok: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if _insert(self.path):
                self.ok.append(time.monotonic())
            else:
                time.sleep(0.0005)

    def __enter__(self) -> Committer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _primary(nodes: list[Node]) -> Node:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for node in nodes:
            if node.role() == "primary":
                return node
        time.sleep(0.05)
    raise TimeoutError("no primary")


def _kill_rounds(nodes: list[Node], rounds: int) -> tuple[list[float], int]:
    """Failover times, and how many killed nodes hung in exit (see Node.reap)."""
    times, stuck = [], 0
    for _ in range(rounds):
        primary = _primary(nodes)
        others = [n for n in nodes if n is not primary]
        committer = Committer(primary).__enter__()
        while len(committer.ok) < 50:
            time.sleep(0.01)
        assert primary.proc is not None
        killed = time.monotonic()
        primary.proc.send_signal(signal.SIGKILL)
        while not any(_insert(n.mnt / DB, busy_ms=20) for n in others):
            time.sleep(0.002)
        times.append(time.monotonic() - killed)
        stuck += primary.reap()
        committer.__exit__()
        primary.start()
        primary.wait_role("replica")
    return times, stuck


def _handoff_rounds(nodes: list[Node], rounds: int) -> tuple[list[float], list[float]]:
    from litefspy.rpc.client import call_unary
    from litefspy.rpc.methods import PROMOTE_METHOD
    from litefspy.v1 import admin_pb2

    gaps, calls = [], []
    for i in range(rounds):
        old = _primary(nodes)
        target = [n for n in nodes if n is not old][i % 2]
        target.wait_role("replica")
        committers = {n.name: Committer(n) for n in (old, target)}
        for c in committers.values():
            c.__enter__()
        try:
            while len(committers[old.name].ok) < 30:
                time.sleep(0.005)
            asked = time.monotonic()
            call_unary(
                target.url,
                PROMOTE_METHOD,
                admin_pb2.PromoteRequest(timeout_seconds=20),
                admin_pb2.PromoteReply,
                timeout=30,
            )
            calls.append(time.monotonic() - asked)
            while len([t for t in committers[target.name].ok if t > asked]) < 10:
                time.sleep(0.005)
        finally:
            for c in committers.values():
                c.__exit__()
        last_old = max(t for t in committers[old.name].ok)
        first_new = min(t for t in committers[target.name].ok if t > asked)
        gaps.append(first_new - last_old)
        time.sleep(1.1)  # demote-delay of the old primary
    return gaps, calls


def run(ttl: float | None = None) -> list[dict[str, Any]]:
    """Measure W8; return result rows."""
    if shutil.which("etcd") is None:
        skipped = {"workload": "W8 failover", "figure": "skipped", "value": 0, "unit": "-"}
        return [{**skipped, "why": "no etcd binary"}]
    ttl = ttl or float(os.environ.get("LITEFSPY_BENCH_TTL", "2"))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="litefspy-bench-failover-") as tmp:
        root = Path(tmp)
        etcd = Etcd(root)
        etcd.start()
        key = f"bench/{uuid.uuid4().hex}/primary"
        nodes = [Node(root, name, etcd, key, ttl) for name in ("a", "b", "c")]
        try:
            nodes[0].start()
            nodes[0].wait_role("primary")
            for node in nodes[1:]:
                node.start()
                node.wait_role("replica")
            conn = sqlite3.connect(nodes[0].mnt / DB, isolation_level=None, timeout=30)
            conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
            conn.close()
            kills, stuck = _kill_rounds(nodes, KILL_ROUNDS)
            rows.append(
                {
                    "workload": f"W8 failover after SIGKILL of the primary (ttl {ttl:g}s)",
                    "figure": "mean",
                    "value": round(statistics.mean(kills), 3),
                    "unit": "s",
                    "max": round(max(kills), 3),
                    "target": f"<= {ttl + 0.5:g}",
                    "rounds": len(kills),
                    "killed_node_hung_in_exit": stuck,
                }
            )
            gaps, calls = _handoff_rounds(nodes, HANDOFF_ROUNDS)
            rows.append(
                {
                    "workload": "W8 handoff (run --promote): write unavailability",
                    "figure": "p50",
                    "value": round(statistics.median(gaps) * 1000, 1),
                    "unit": "ms",
                    "max": round(max(gaps) * 1000, 1),
                    "target": "<= 50",
                    "promote_call_ms": round(statistics.median(calls) * 1000, 1),
                    "rounds": len(gaps),
                }
            )
        finally:
            for node in nodes:
                node.stop()
            etcd.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    parser.add_argument("--ttl", type=float, help="lease TTL in seconds (default 2)")
    args = parser.parse_args()
    for row in run(args.ttl):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
