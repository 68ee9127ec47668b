"""A network partition: the primary is cut off from etcd and from its replicas.

Each node runs in its own network namespace (`ip netns exec`, which also
gives it its own mount namespace: the test reaches its mount through
`/proc/PID/root`), joined to the root namespace by a veth pair on a bridge
that only this test creates and uses; etcd listens on the bridge's address.
The partition is an nftables table inside the primary's namespace that drops
everything but loopback. SQLite runs inside the node's mount namespace
(`nsenter -m`): it resolves `/proc/PID/root` as a plain symlink to `/`, so it
cannot reach the mount from the test's namespace.

What must hold: the primary stops accepting writes before its lease can
expire in etcd, so before anyone else can be elected; a replica is elected;
after healing there is one history, and what the deposed primary committed
during the partition is kept aside on it (with a log line saying where),
not silently dropped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import etcd_lease, role, try_status, wait_role
from tests.support.etcd_server import EtcdServer, require_etcd_binary
from tests.support.nodes import NodeProcess, wait_for

TTL = 2.0
DB = "app.db"

# Run in a node's mount namespace: `python -c IN_NAMESPACE OP DB-PATH [ARG]`.
IN_NAMESPACE = r"""
import json, sqlite3, sys, time

op, path = sys.argv[1], sys.argv[2]


def insert(value, busy_ms):
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


if op == "exec":
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(sys.argv[3])
elif op == "read":
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    rows = sorted(r[0] for r in conn.execute("SELECT x FROM t"))
    print(json.dumps({"dump": list(conn.iterdump()), "values": rows}))
elif op == "write":  # commit ARG, ARG+1, ... until refused: "value monotonic-time" each
    value = int(sys.argv[3])
    while insert(value, 200):
        print(value, time.monotonic(), flush=True)
        value += 1
        time.sleep(0.002)
elif op == "probe":  # retry committing ARG until it works; print when
    while not insert(int(sys.argv[3]), 50):
        time.sleep(0.01)
    print(time.monotonic(), flush=True)
"""


def sh(
    *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, check=check)


class BridgeNetwork:
    """A bridge in the root namespace and one network namespace per node."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.bridge = f"lfb{tag}"
        self.namespaces: list[str] = []
        self._count = 0
        used = sh("ip", "-4", "-o", "addr", "show").stdout
        while True:
            a, b = random.randint(100, 250), random.randint(0, 255)
            net = ipaddress.ip_network(f"10.{a}.{b}.0/24")
            if f" 10.{a}.{b}." not in used:
                break
        self.net = net
        self.gateway = str(net.network_address + 1)

    def create(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add_namespace(self) -> tuple[str, str]:
        """A new namespace on the bridge; returns (name, its address)."""
        self._count += 1
        index = self._count
        ns, host_end = f"lfp{self.tag}{index}", f"lfv{self.tag}{index}"
        address = str(self.net.network_address + 10 + index)
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", host_end, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns, address

    def partition(self, ns: str) -> None:
        """Drop every packet into or out of `ns` except on loopback."""
        rules = (
            "table inet litefspy_partition {\n"
            "  chain input { type filter hook input priority 0; policy drop; iif lo accept; }\n"
            "  chain output { type filter hook output priority 0; policy drop; oif lo accept; }\n"
            "}\n"
        )
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=rules)

    def heal(self, ns: str) -> None:
        sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "litefspy_partition")

    def destroy(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)  # also removes its veth pair
        sh("ip", "link", "del", self.bridge, check=False)


class BridgeEtcd(EtcdServer):
    """The test etcd, listening on the bridge address instead of 127.0.0.1."""

    def __init__(self, data_root: Path, binary: str, host: str) -> None:
        super().__init__(data_root, binary=binary)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"


class NamespacedNode(NodeProcess):
    """A node process inside a network namespace, reached at its own address."""

    def __init__(
        self, root: Path, name: str, ns: str, address: str, lease: str, *, config_extra: str = ""
    ) -> None:
        super().__init__(root, name, lease=lease, config_extra=config_extra)
        self.ns = ns
        self.address = address
        self.config_path.write_text(
            self.config_path.read_text()
            .replace("127.0.0.1", address)
            .replace("__ADVERTISE_URL__", self.url)
        )

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def launch_prefix(self) -> list[str]:
        # `ip netns exec` execs the command: the child's pid is the node's.
        return ["ip", "netns", "exec", self.ns]

    @property
    def view(self) -> Path:
        """The mount as the node's own mount namespace sees it."""
        assert self.proc is not None, f"{self.name} is not running"
        return Path(f"/proc/{self.proc.pid}/root{self.mnt}")

    def in_namespace(self, op: str, *args: str) -> list[str]:
        """A command running IN_NAMESPACE on DB inside this node's mount namespace."""
        assert self.proc is not None, f"{self.name} is not running"
        pid = str(self.proc.pid)
        code = [sys.executable, "-c", IN_NAMESPACE, op, str(self.db(DB)), *args]
        return ["nsenter", "-t", pid, "-m", "--", *code]

    def sql(self, script: str) -> None:
        sh(*self.in_namespace("exec", script))

    def read(self) -> tuple[list[str], list[int]]:
        """(iterdump lines, values of t) of DB."""
        out = json.loads(sh(*self.in_namespace("read")).stdout)
        return out["dump"], out["values"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        # The mount lives and dies with the node's own mount namespace.
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code


@pytest.fixture
def network() -> Iterator[BridgeNetwork]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    net = BridgeNetwork()
    try:
        net.create()
        # Probe: a namespace with its veth pair, deleted again.
        sh("ip", "netns", "del", net.add_namespace()[0])
        net.namespaces.pop()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        net.destroy()
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        pytest.skip(f"cannot create network namespaces with veth pairs: {detail}")
    try:
        yield net
    finally:
        net.destroy()


class NamespacedWriter:
    """Commits 1, 2, 3... on a node, each its own transaction, until refused."""

    def __init__(self, node: NamespacedNode) -> None:
        self.acked: list[int] = []
        self.last_ok = 0.0
        self.proc = subprocess.Popen(
            node.in_namespace("write", "1"), stdout=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            value, at = line.split()
            self.acked.append(int(value))
            self.last_ok = float(at)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def first_writable(
    nodes: list[NamespacedNode], value: int, timeout: float
) -> tuple[NamespacedNode, float]:
    """The first node to commit `value` (one probe per node), and when it did."""
    probes = [
        subprocess.Popen(n.in_namespace("probe", str(value)), stdout=subprocess.PIPE, text=True)
        for n in nodes
    ]
    try:
        winner = wait_for(
            lambda: next((i + 1 for i, p in enumerate(probes) if p.poll() == 0), 0),
            timeout,
            interval=0.005,
            what="a node to accept a write",
        )
        out, _ = probes[winner - 1].communicate()
        return nodes[winner - 1], float(out)
    finally:
        for probe in probes:
            if probe.poll() is None:
                probe.kill()
            probe.wait()
            assert probe.stdout is not None
            probe.stdout.close()


def wait_same(nodes: list[NamespacedNode], timeout: float = 30) -> None:
    def same() -> bool:
        try:
            return len({n.pos(DB) for n in nodes}) == 1
        except (OSError, ValueError):
            return False

    try:
        wait_for(same, timeout, what="the same position everywhere")
    except TimeoutError:
        logs = "\n".join(f"--- {n.name}\n{n.log()[-3000:]}" for n in nodes)
        raise AssertionError(f"positions differ\n{logs}") from None


def test_partitioned_primary_demotes_before_expiry_and_keeps_its_work_aside(
    tmp_path: Path, network: BridgeNetwork
) -> None:
    binary = require_etcd_binary()
    etcd = BridgeEtcd(tmp_path / "etcd", binary, network.gateway)
    (tmp_path / "etcd").mkdir()
    etcd.start()
    nodes: list[NamespacedNode] = []
    try:
        key = f"partition/{uuid.uuid4().hex}/primary"
        # Every node backs up to the same store (a directory, which the partition does
        # not cut off: the deposed primary can go on uploading until it demotes).
        backup_url = (tmp_path / "backup").as_uri()
        backup = f"backup:\n  url: {backup_url}\n  sync-interval: 200ms\n"
        for name in ("p", "q", "r"):
            ns, address = network.add_namespace()
            lease = etcd_lease(etcd.url, key, name, ttl=f"{TTL:g}s")
            nodes.append(NamespacedNode(tmp_path, name, ns, address, lease, config_extra=backup))
        p, q, r = nodes
        p.start()
        wait_role(p, "primary")
        q.start()
        r.start()
        wait_role(q, "replica")
        wait_role(r, "replica")
        p.sql("PRAGMA journal_mode=WAL; CREATE TABLE t (x INTEGER PRIMARY KEY);")
        wait_same(nodes)

        writer = NamespacedWriter(p)
        try:
            wait_for(lambda: len(writer.acked) >= 50, 30, what="writes on p")
            cut_at = time.monotonic()
            network.partition(p.ns)
            new, elected_at = first_writable([q, r], 1_000_000, TTL + 2.5)
            wait_for(lambda: not writer.running(), 5, what="p to refuse writes")
        finally:
            writer.stop()
        # p refused writes before etcd could let anyone else in.
        assert writer.last_ok < elected_at
        assert writer.last_ok - cut_at < TTL, writer.last_ok - cut_at
        assert "demoting: no longer the primary" in p.log_path.read_text()
        other = r if new is q else q
        wait_role(other, "replica")
        assert try_status(p) is None  # unreachable from here while partitioned

        network.heal(p.ns)
        wait_role(p, "replica", 30)
        wait_same(nodes)
        dump, final_values = new.read()
        assert p.read()[0] == dump == other.read()[0]
        final = set(final_values)
        unreplicated = set(writer.acked) - final
        assert unreplicated, "p wrote nothing during the partition: make the test write more"
        asides = list((p.data / "dbs" / DB).glob("aside-*"))
        assert len(asides) == 1, asides
        log = p.log_path.read_text()
        assert "LTX files were set aside" in log and str(asides[0]) in log
        kept = aside_values(asides[0] / "database")
        assert unreplicated <= kept
        assert role(new) == "primary"

        # The backup: p's uploads past the fork are a listed branch, never part of
        # what the new primary's history restores.
        wait_for(lambda: backed_up(new) >= new.pos(DB)[0], 30, what="the new primary's backup")
        listing = json.loads(cli("backup", "list", "--url", backup_url, "--json").stdout)
        (entry,) = listing
        assert entry["newest"]["txid"] == f"{new.pos(DB)[0]:016x}"
        p_epoch = {b["epoch"] for b in entry["branches"]}
        assert entry["branches"] and len(p_epoch) == 1, entry["branches"]
        restored = tmp_path / "restored.db"
        res = cli("restore", "--url", backup_url, "--db", DB, "-o", str(restored))
        assert res.returncode == 0, res.stderr
        assert aside_values(restored) == final
        assert not unreplicated & aside_values(restored)
        # A restore at the branch's newest TXID never gives p's lost writes: that
        # TXID is either the new primary's (its state then) or past its history.
        branch_top = max(int(b["max_txid"], 16) for b in entry["branches"])
        res = cli(
            "restore",
            "--url",
            backup_url,
            "--db",
            DB,
            "-o",
            str(restored),
            "--force",
            "--txid",
            f"{branch_top:x}",
        )
        if branch_top > new.pos(DB)[0]:
            assert res.returncode == 1 and "past the newest" in res.stderr, res.stderr
        else:
            assert res.returncode == 0, res.stderr
            assert not unreplicated & aside_values(restored)
    finally:
        for node in nodes:
            node.stop()
        etcd.kill()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def backed_up(node: NamespacedNode) -> int:
    """The TXID of DB the node's backup has uploaded (0 if none yet)."""
    status = try_status(node) or {}
    for entry in (status.get("backup") or {}).get("databases", []):
        if entry["name"] == DB:
            return int(entry["uploaded_txid"], 16)
    return 0


def aside_values(path: Path) -> set[int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return {int(row[0]) for row in conn.execute("SELECT x FROM t")}
    finally:
        conn.close()
