"""Write forwarding: `litefspy run --with-halt-lock-on DB` against real node processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.cluster import (
    connect,
    dump,
    integrity,
    replica_of,
    status,
    try_insert,
    values,
    wait_same_pos,
)
from tests.support.disk import small_tmpfs
from tests.support.nodes import NodeProcess, wait_for

# The command the tests run under the halt lock: writes rows on the replica's
# mount in separate transactions, checks on the way that the primary's own
# writers are paused, and reports in `out`.
WRITER = textwrap.dedent(
    """
    import sqlite3, sys
    replica_db, primary_db, first, count, out = sys.argv[1:6]
    conn = sqlite3.connect(replica_db, isolation_level=None, timeout=10)
    report = []
    for i in range(int(first), int(first) + int(count)):
        conn.execute("INSERT INTO t (x) VALUES (?)", (i,))
    conn.execute("BEGIN")
    conn.execute("UPDATE t SET x = x * 10 WHERE x >= ?", (int(first),))
    conn.execute("COMMIT")
    other = sqlite3.connect(primary_db, isolation_level=None, timeout=0.2)
    try:
        other.execute("INSERT INTO t (x) VALUES (-1)")
        report.append("primary-writable")
    except sqlite3.OperationalError as exc:
        report.append("primary-paused:" + str(exc))
    report.append("rows:" + str(conn.execute("SELECT count(*) FROM t").fetchone()[0]))
    open(out, "w").write("\\n".join(report))
    """
)


def _halted(replica: NodeProcess, *command: str) -> list[str]:
    """`litefspy run --with-halt-lock-on app.db -- COMMAND` through `replica`."""
    return [
        sys.executable,
        "-m",
        "litefspy",
        "run",
        "--url",
        replica.url,
        "--with-halt-lock-on",
        "app.db",
        "--",
        *command,
    ]


def run_halted(replica: NodeProcess, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _halted(replica, *command), capture_output=True, text=True, timeout=60, check=False
    )


def litefspy(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _cluster(node_factory, mode: str) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    primary: NodeProcess = node_factory("primary").start()
    replicas = [replica_of(node_factory, primary, f"replica{i}").start() for i in (1, 2)]
    conn = connect(primary.db("app.db"), mode)
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.execute("INSERT INTO t (x) VALUES (0)")
    conn.close()
    wait_same_pos(primary, replicas, "app.db")
    return primary, replicas[0], replicas[1]


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_replica_writes_under_halt_lock_replicate_everywhere(
    node_factory, tmp_path: Path, mode: str
) -> None:
    primary, replica, other = _cluster(node_factory, mode)
    before = primary.pos("app.db")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "out.txt"
    res = run_halted(
        replica,
        sys.executable,
        str(script),
        str(replica.db("app.db")),
        str(primary.db("app.db")),
        "1",
        "20",
        str(out),
    )
    assert res.returncode == 0, res.stderr + replica.log() + primary.log()
    assert "halt lock on app.db held" in res.stderr
    report = out.read_text().splitlines()
    assert report[0].startswith("primary-paused:") and "locked" in report[0], report
    assert report[1] == "rows:21"

    # 20 inserts + 1 update: 21 new TXIDs, made by the primary, on every node.
    pos = wait_same_pos(primary, [replica, other], "app.db")
    assert pos[0] == before[0] + 21
    expected = [0] + [10 * i for i in range(1, 21)]
    for node in (primary, replica, other):
        assert values(node, "app.db") == expected, node.name
        assert integrity(node, "app.db") == "ok"
    names = [p.name for p in primary.ltx_files("app.db")]
    assert len(names) == pos[0] and names[-1].startswith(f"{pos[0]:016x}")

    # The halt is over: the primary writes again, the replica is read-only again.
    assert try_insert(primary.db("app.db"), 1000, busy_ms=5000)
    wait_same_pos(primary, [replica, other], "app.db")
    with pytest.raises(sqlite3.OperationalError):
        conn = connect(replica.db("app.db"))
        try:
            conn.execute("INSERT INTO t (x) VALUES (5)")
        finally:
            conn.close()
    assert dump(replica, "app.db") == dump(primary, "app.db") == dump(other, "app.db")


def test_halt_lock_on_the_primary_runs_the_command_as_is(node_factory, tmp_path: Path) -> None:
    primary: NodeProcess = node_factory("primary").start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    sql = "INSERT INTO t (x) VALUES (7);"
    res = litefspy(
        "run",
        "--url",
        primary.url,
        "--with-halt-lock-on",
        "app.db",
        "--",
        "sqlite3",
        str(primary.db("app.db")),
        sql,
    )
    assert res.returncode == 0, res.stderr
    assert "is the primary" in res.stderr
    assert values(primary, "app.db") == [7]


def test_halt_lock_refusals(node_factory) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica: NodeProcess = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")
    cases = [
        ("nope.db", "database nope.db does not exist on the primary"),
        ("bad/name", "invalid database name"),
    ]
    for name, message in cases:
        res = litefspy("run", "--url", replica.url, "--with-halt-lock-on", name, "--", "true")
        assert res.returncode == 1, res
        assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    res = litefspy("run", "--url", replica.url, "--with-halt-lock-on", "app.db")
    assert res.returncode == 2 and "needs -- CMD" in res.stderr
    # Nothing was left locked: the primary writes at once.
    assert try_insert(primary.db("app.db"), 1, busy_ms=100)
    # Without a primary there is nobody to forward to.
    primary.stop()
    wait_for(lambda: not (replica.mnt / ".primary").exists(), 30, what="the replica to notice")
    res = litefspy("run", "--url", replica.url, "--with-halt-lock-on", "app.db", "--", "true")
    assert res.returncode == 1, res
    # (A static replica still knows where its primary should be: it says it cannot reach it.)
    assert "cannot get the halt lock on app.db" in res.stderr, res.stderr
    assert "cannot reach" in res.stderr or "not connected to a primary" in res.stderr
    assert res.stderr.count("\n") == 1, res.stderr


HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    replica_db, ready = sys.argv[1:3]
    conn = sqlite3.connect(replica_db, isolation_level=None, timeout=10)
    conn.execute("INSERT INTO t (x) VALUES (1)")
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t (x) VALUES (2)")
    open(ready, "w").write("in transaction")
    time.sleep(600)
    """
)


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_crashed_halt_holder_leaves_the_cluster_consistent(
    node_factory, tmp_path: Path, mode: str
) -> None:
    primary, replica, other = _cluster(node_factory, mode)
    cli, _ = _start_holder(replica, tmp_path)
    try:
        # The committed row is everywhere already; the primary's writers wait.
        assert values(primary, "app.db") == [0, 1]
        assert not try_insert(primary.db("app.db"), 99, busy_ms=200)
        # `litefspy status` names the holder on both sides.
        for node in (primary, replica):
            (db,) = status(node)["databases"]
            assert db["halt_holder"] == "replica1", node.name
        res = litefspy("status", "--url", primary.url)
        assert "halt lock: replica1" in res.stdout
    finally:
        # The CLI and its command die without a word (kill -9 of the group).
        _kill_group(cli)
    # The primary takes writes again (the lock went with the CLI's call) ...
    assert try_insert(primary.db("app.db"), 3, busy_ms=15000)
    # ... and every node has the same committed state: the open transaction is nowhere.
    wait_same_pos(primary, [replica, other], "app.db")
    for node in (primary, replica, other):
        assert values(node, "app.db") == [0, 1, 3], node.name
        assert integrity(node, "app.db") == "ok"
        assert status(node)["databases"][0]["halt_holder"] is None
    assert not replica.db("app.db-journal").exists() or mode != "delete"


COMMIT_LATER = textwrap.dedent(
    """
    import os, sqlite3, sys, time
    replica_db, ready, go, out = sys.argv[1:5]
    conn = sqlite3.connect(replica_db, isolation_level=None, timeout=1)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t (x) VALUES (2)")
    open(ready, "w").write("in transaction")
    while not os.path.exists(go):
        time.sleep(0.02)
    try:
        conn.execute("COMMIT")
        result = "committed"
    except sqlite3.Error as exc:
        result = "failed: " + str(exc)
    open(out, "w").write(result)
    """
)


def _start_commit_later(
    replica: NodeProcess, tmp_path: Path, output: int
) -> tuple[subprocess.Popen[str], Path, Path, Path]:
    """Run COMMIT_LATER under the halt lock through `replica`: (cli, ready, go, out)."""
    script = tmp_path / "later.py"
    script.write_text(COMMIT_LATER)
    ready, go, out = tmp_path / "ready", tmp_path / "go", tmp_path / "out"
    command = [
        sys.executable,
        str(script),
        str(replica.db("app.db")),
        str(ready),
        str(go),
        str(out),
    ]
    cli = subprocess.Popen(_halted(replica, *command), stdout=output, stderr=output, text=True)
    return cli, ready, go, out


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_commit_fails_cleanly_when_the_primary_goes_away(
    node_factory, tmp_path: Path, mode: str
) -> None:
    primary, replica, other = _cluster(node_factory, mode)
    before = primary.pos("app.db")
    cli, ready, go, out = _start_commit_later(replica, tmp_path, subprocess.PIPE)
    try:
        wait_for(ready.exists, 30, what="the command's open transaction")
        primary.kill()
        go.write_text("go")
        _, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert out.read_text().startswith("failed:"), (out.read_text(), err)
    assert "lost" in err or "not accepted" in err, err
    # Nothing of the transaction stayed on the replica ...
    assert replica.pos("app.db") == before
    assert values(replica, "app.db") == [0]
    assert integrity(replica, "app.db") == "ok"
    # ... and with the primary back, everything goes on from the same state.
    primary.start()
    assert try_insert(primary.db("app.db"), 5, busy_ms=5000)
    wait_same_pos(primary, [replica, other], "app.db")
    for node in (primary, replica, other):
        assert values(node, "app.db") == [0, 5], node.name


def _start_holder(replica: NodeProcess, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """`litefspy run --with-halt-lock-on` a command that commits a row and then sits in a
    transaction; returns once the transaction is open."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    ready = tmp_path / "ready"
    cli = subprocess.Popen(
        _halted(
            replica,
            sys.executable,
            str(script),
            str(replica.db("app.db")),
            str(ready),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(ready.exists, 30, what="the holder's open transaction")
    return cli, ready


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_replica_node_killed_while_holding_the_halt_lock(
    node_factory, tmp_path: Path, mode: str
) -> None:
    primary, replica, other = _cluster(node_factory, mode)
    cli, _ = _start_holder(replica, tmp_path)
    try:
        replica.kill()  # the node dies mid-transaction of the halt holder
    finally:
        _kill_group(cli)
    # Its connection to the primary died with it: the primary's writers go on.
    assert try_insert(primary.db("app.db"), 3, busy_ms=15000)
    # The replica recovers its files (the open transaction is rolled back or set
    # aside, the forwarded commit stays) and catches up.
    replica.start()
    wait_same_pos(primary, [replica, other], "app.db")
    for node in (primary, replica, other):
        assert values(node, "app.db") == [0, 1, 3], node.name
        assert integrity(node, "app.db") == "ok"


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_halt_lock_of_a_frozen_replica_expires(node_factory, tmp_path: Path, mode: str) -> None:
    primary, replica, other = _cluster(node_factory, mode)
    cli, _ = _start_holder(replica, tmp_path)
    assert replica.proc is not None
    try:
        replica.proc.send_signal(signal.SIGSTOP)
        # No renewal arrives: after the TTL the primary lets its writers go on.
        assert try_insert(primary.db("app.db"), 3, busy_ms=30000)
        assert "halt lock expired" in primary.log_path.read_text()
    finally:
        replica.proc.send_signal(signal.SIGCONT)
        _kill_group(cli)
    # The thawed replica learns it lost the lock, drops the open transaction and
    # applies the primary's newer commit on top of the forwarded one.
    wait_same_pos(primary, [replica, other], "app.db")
    for node in (primary, replica, other):
        assert values(node, "app.db") == [0, 1, 3], node.name
        assert integrity(node, "app.db") == "ok"
    assert not try_insert(replica.db("app.db"), 4)


def test_large_forwarded_transaction(node_factory, tmp_path: Path) -> None:
    """A transaction bigger than the in-memory limit is spooled on the primary."""
    primary, replica, other = _cluster(node_factory, "wal")
    sql = "INSERT INTO t (x) SELECT length(b) FROM big;"
    blob = "CREATE TABLE big (b); INSERT INTO big VALUES (randomblob(12000000));"
    res = run_halted(
        replica,
        "sqlite3",
        str(replica.db("app.db")),
        blob + sql,
    )
    assert res.returncode == 0, res.stderr + primary.log()
    wait_same_pos(primary, [replica, other], "app.db")
    assert max(p.stat().st_size for p in primary.ltx_files("app.db")) > 8 << 20
    for node in (primary, replica, other):
        assert values(node, "app.db") == [0, 12000000], node.name
        assert integrity(node, "app.db") == "ok"


def test_commit_rpc_refuses_bad_input_and_changes_nothing(node_factory) -> None:
    """Garbage, corrupt, truncated or out-of-place LTX uploads to Halt.Commit."""
    from litefspy.api.halt import COMMIT_METHOD, LOCK_METHOD
    from litefspy.rpc.client import CallHandle, call_client_stream
    from litefspy.rpc.errors import RemoteError
    from litefspy.v1 import halt_pb2 as pb

    primary: NodeProcess = node_factory("primary").start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    before = primary.pos("app.db")
    own = primary.ltx_files("app.db")[-1].read_bytes()  # valid, but does not continue
    corrupt = bytearray(own)
    corrupt[len(corrupt) // 2] ^= 0xFF

    lock = CallHandle(
        primary.url, LOCK_METHOD, pb.LockRequest(name="app.db", holder="t"), pb.LockEvent
    )
    events = iter(lock)
    try:
        halt_id = next(events).acquired.halt_id

        def commit(data: bytes, *, size: int | None = None, halt: str = halt_id) -> str:
            start = pb.CommitStart(
                name="app.db", halt_id=halt, size=len(data) if size is None else size
            )
            requests = [pb.CommitRequest(start=start), pb.CommitRequest(data=data)]
            with pytest.raises(RemoteError) as info:
                call_client_stream(
                    primary.url,
                    COMMIT_METHOD,
                    iter(requests),
                    request_type=pb.CommitRequest,
                    response_type=pb.CommitReply,
                    timeout=30,
                )
            return str(info.value)

        assert "does not continue" in commit(own)
        assert "refused" in commit(bytes(corrupt))
        assert "refused" in commit(b"not an LTX file at all" * 10)
        assert "ended after" in commit(own, size=len(own) + 100)
        assert "no halt lock" in commit(own, halt="0123456789abcdef")
        # The primary's writers are still paused, its state unchanged.
        assert not try_insert(primary.db("app.db"), 2, busy_ms=100)
        assert primary.pos("app.db") == before
    finally:
        lock.cancel()
    assert try_insert(primary.db("app.db"), 2, busy_ms=5000)
    assert values(primary, "app.db") == [1, 2]
    assert integrity(primary, "app.db") == "ok"


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_unanswered_forwarded_commit_fails_and_the_cluster_converges(
    node_factory, tmp_path: Path, mode: str
) -> None:
    """The primary freezes while it has a forwarded commit: the commit times out on the
    replica (rolled back there), and whatever the primary did with it once it thaws,
    every node ends with the same state."""
    primary, replica, other = _cluster(node_factory, mode)
    cli, ready, go, out = _start_commit_later(replica, tmp_path, subprocess.DEVNULL)
    assert primary.proc is not None
    try:
        wait_for(ready.exists, 30, what="the command's open transaction")
        primary.proc.send_signal(signal.SIGSTOP)
        go.write_text("go")
        # The forwarded commit waits for the frozen primary (up to 15 s) in a worker
        # thread: meanwhile the replica node itself answers at once.
        time.sleep(1.0)
        assert not out.exists()
        started = time.monotonic()
        answer = status(replica)
        assert time.monotonic() - started < 5.0, "the replica node froze"
        assert answer["role"] == "replica", answer
        assert not out.exists(), "the commit ended before the replica was asked"
        wait_for(out.exists, 60, what="the command's commit to end")
    finally:
        primary.proc.send_signal(signal.SIGCONT)
        cli.wait(60)
    assert out.read_text().startswith("failed:"), out.read_text()
    assert "not accepted" in replica.log_path.read_text()
    assert try_insert(primary.db("app.db"), 5, busy_ms=20000)
    wait_same_pos(primary, [replica, other], "app.db")
    final = values(primary, "app.db")
    assert final in ([0, 5], [0, 2, 5])
    for node in (replica, other):
        assert values(node, "app.db") == final, node.name
        assert integrity(node, "app.db") == "ok"


def test_full_disk_on_the_primary_mid_forwarded_apply(node_factory, tmp_path: Path) -> None:
    """The primary's disk fills while it writes a forwarded transaction's pages: the
    commit fails, the database goes offline on the primary (nothing may use a half
    written file), and a restart with space again re-applies it; all nodes converge."""
    primary: NodeProcess = node_factory("primary")
    with small_tmpfs(primary.data, "24m"):
        try:
            primary.start()
            replica = replica_of(node_factory, primary).start()
            conn = connect(primary.db("app.db"), "delete")
            conn.execute("CREATE TABLE t (x INTEGER)")
            conn.execute("CREATE TABLE big (b BLOB)")
            conn.execute("INSERT INTO t VALUES (0)")
            conn.close()
            wait_same_pos(primary, [replica], "app.db")
            # Leave 3 MiB: room for the 2 MB LTX file, not for the database to grow by it too.
            st = os.statvfs(primary.data)
            filler = primary.data / "filler"
            filler.write_bytes(bytes(st.f_bavail * st.f_frsize - (3 << 20)))
            res = run_halted(
                replica,
                "sqlite3",
                str(replica.db("app.db")),
                "INSERT INTO big VALUES (randomblob(2000000));",
            )
            assert res.returncode != 0, res
            assert "is offline" in primary.log_path.read_text()
            assert not try_insert(primary.db("app.db"), 5)
            # Space again, and a restart: recovery re-applies the forwarded transaction.
            filler.unlink()
            primary.stop()
            primary.start()
            wait_same_pos(primary, [replica], "app.db")
            assert dump(primary, "app.db") == dump(replica, "app.db")
            for node in (primary, replica):
                assert integrity(node, "app.db") == "ok"
            assert try_insert(primary.db("app.db"), 5, busy_ms=5000)
            wait_same_pos(primary, [replica], "app.db")
            assert values(replica, "app.db") == [0, 5]
        finally:
            primary.stop()
