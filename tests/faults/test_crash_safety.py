"""Crash safety: a killed node never hangs and never leaves its app, its data dir or a mess.

`make test` runs the suite in a private mount namespace without fusectl, as on
a fresh machine; test_no_fusectl_here makes sure that is so when it says so.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fs.test_fs_capture import assert_reproduces
from tests.support.cluster import MODES, connect, dump, integrity, replica_of, wait_same_pos
from tests.support.nodes import NodeProcess, free_port, wait_for

PY = shlex.quote(sys.executable)


def _fusectl_mounted() -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == "/sys/fs/fuse/connections" for line in f)


@pytest.mark.skipif(
    os.environ.get("LITEFSPY_TEST_NO_FUSECTL") != "1", reason="not run by `make test`"
)
def test_no_fusectl_here() -> None:
    assert not _fusectl_mounted(), "make test must hide fusectl, as a fresh machine has none"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------- data.dir owner


def test_second_node_on_the_same_data_dir_is_refused(node_factory, tmp_path: Path) -> None:
    first: NodeProcess = node_factory("first").start()
    conn = connect(first.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    second: NodeProcess = node_factory("second")
    second.config_path.write_text(
        second.config_path.read_text().replace(str(second.data), str(first.data))
    )
    out = subprocess.run(
        [sys.executable, "-m", "litefspy", "mount", "-c", str(second.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 1
    assert first.proc is not None
    assert out.stderr == (
        f"litefspy: data.dir {first.data} is in use by pid {first.proc.pid}; stop that node "
        "first or give this one its own data.dir\n"
    )
    assert not os.path.ismount(second.mnt)
    # The first node is untouched and goes on.
    conn = connect(first.db("app.db"))
    conn.execute("INSERT INTO t VALUES (2)")
    assert [r[0] for r in conn.execute("SELECT x FROM t")] == [1, 2]
    conn.close()
    # Once the owner is gone (even killed), the directory is free again.
    first.kill()
    first.start()
    assert first.pos("app.db")[0] == 3


# ------------------------------------------------------------- exec: the app


APP = r"""
import os, socket, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen(["sleep", "600"])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
s.bind(("127.0.0.1", int(sys.argv[2])))
s.listen()
with open(out + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(out + ".tmp", out)
time.sleep(600)
"""


def test_exec_app_and_its_children_die_with_a_killed_node(node_factory, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    port = free_port()
    cmd = f"{PY} -c {shlex.quote(APP)} {pids} {port}"
    node: NodeProcess = node_factory("node", config_extra=f"exec: {json.dumps(cmd)}\n")
    for _ in range(2):
        pids.unlink(missing_ok=True)
        node.start()
        wait_for(pids.exists, 30, what="the app to start")
        app, child = map(int, pids.read_text().split())
        assert _alive(app) and _alive(child)
        node.kill()
        # Gone within a second of the node, the app's own child too.
        wait_for(lambda a=app, c=child: not _alive(a) and not _alive(c), 1.5, what="app gone")
    # The second round's app could bind the port again: no restart loop.
    assert "Address already in use" not in node.log()


# --------------------------------------------------------- mount failures


def _mount_in_namespace(node: NodeProcess, setup: str, *, unprivileged: bool = False):
    """`litefspy mount` after `setup` ran in a private mount namespace."""
    run = f"{PY} -m litefspy mount -c {shlex.quote(str(node.config_path))}"
    if unprivileged:
        # Root without the capabilities that override file permissions.
        run = f"setpriv --bounding-set=-dac_override,-dac_read_search {run}"
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{setup} && exec {run}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_no_dev_fuse_is_one_line_and_creates_nothing(node_factory) -> None:
    node: NodeProcess = node_factory("node")
    out = _mount_in_namespace(node, "mount -t tmpfs none /dev")
    assert out.returncode == 1, out.stderr
    assert out.stderr == (
        "litefspy: cannot mount: /dev/fuse does not exist; load the fuse module "
        "(modprobe fuse) or, in a container, run it with --device /dev/fuse "
        "--cap-add SYS_ADMIN\n"
    )
    assert not node.data.exists() and not node.mnt.exists()


def test_permission_denied_on_dev_fuse_is_one_line(node_factory) -> None:
    node: NodeProcess = node_factory("node")
    out = _mount_in_namespace(
        node, "mount -t tmpfs none /dev && mknod -m 000 /dev/fuse c 10 229", unprivileged=True
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr == (
        "litefspy: cannot mount: permission denied opening /dev/fuse; run litefspy as root, "
        "or in a container, run it with --device /dev/fuse --cap-add SYS_ADMIN\n"
    )
    assert not node.data.exists() and not node.mnt.exists()


# ------------------------------------------------------------- kill -9 loop

WRITER = r"""
import sqlite3, sys
path, mode, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = sqlite3.connect(path, isolation_level=None, timeout=30)
conn.execute("PRAGMA busy_timeout=30000")
i = start
while True:
    try:
        conn.execute("INSERT INTO t VALUES (?, randomblob(1500))", (i,))
    except sqlite3.Error:
        sys.exit(0)          # the mount went away under us
    print(i, flush=True)     # only printed once COMMIT returned
    i += 1
"""


def _acknowledged(out: str) -> set[int]:
    return {int(line) for line in out.split() if line.strip()}


@pytest.mark.parametrize("mode", MODES)
def test_kill9_loop_primary_and_replica(node_factory, tmp_path: Path, mode: str) -> None:
    """SIGKILL the primary or the replica at random moments under writes, a few rounds.

    Every round: the killed node exits (no hang: NodeProcess raises NodeHung),
    every acknowledged row is on the primary, SQLite finds it sound, the LTX
    chain replays to the database, and the replica converges to the same dump.
    """
    rng = random.Random(f"kill9-{mode}")
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"), mode)
    conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
    conn.close()
    acknowledged: set[int] = set()
    deadline = time.monotonic() + 25
    rounds = 0
    while rounds < 3 and time.monotonic() < deadline:
        rounds += 1
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(primary.db("app.db")), mode, str(rounds * 100000)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(0.3, 1.2))
        victim = primary if rounds % 2 else replica
        victim.kill()
        if victim is replica:
            writer.terminate()
        out, _ = writer.communicate(timeout=60)
        acknowledged |= _acknowledged(out)
        victim.start()
        conn = sqlite3.connect(primary.db("app.db"), timeout=30)
        present = {r[0] for r in conn.execute("SELECT i FROM t")}
        conn.close()
        missing = acknowledged - present
        assert not missing, f"round {rounds}: acknowledged rows lost: {sorted(missing)[:10]}"
        assert integrity(primary, "app.db") == "ok"
        wait_same_pos(primary, [replica], "app.db", timeout=60)
        assert dump(replica, "app.db") == dump(primary, "app.db")
        assert "database offline" not in primary.log() + replica.log()
    assert rounds >= 2 and acknowledged
    assert_reproduces(primary, "app.db", mode, tmp_path)
