"""A node killed with SIGKILL exits at once, even with descriptors open on its own mount."""

from __future__ import annotations

import signal
import sqlite3
import subprocess

from tests.support.cluster import replica_of, wait_same_pos
from tests.support.nodes import NodeProcess


def test_sigkill_of_a_replica_holding_lock_descriptors_exits(node_factory) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    conn = sqlite3.connect(primary.db("app.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (x)")
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    conn.close()
    # Applying took SQLite's locks through the replica's own mount (cached descriptors).
    wait_same_pos(primary, [replica], "app.db")
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGKILL)
    try:
        replica.proc.wait(10)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("a killed node hung on exit (FLUSH to the dead daemon?)") from exc


def test_sigkill_with_readers_dirtying_the_mmapped_shm_exits(node_factory) -> None:
    """Readers write their read marks into -shm through mmap; at exit the kernel flushes
    those pages for each descriptor the daemon holds on its own mount, which needs the
    daemon: without the watchdog that aborts the connection, the process never ends."""
    primary: NodeProcess = node_factory("primary").start()
    conn = sqlite3.connect(primary.db("app.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    for attempt in range(3):
        replica = replica_of(node_factory, primary, f"replica{attempt}").start()
        writer = sqlite3.connect(primary.db("app.db"), isolation_level=None)
        for i in range(5):
            writer.execute("INSERT INTO t VALUES (?)", (i,))
        writer.close()
        wait_same_pos(primary, [replica], "app.db")
        readers = [sqlite3.connect(replica.db("app.db"), isolation_level=None) for _ in range(3)]
        for reader in readers:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM t").fetchone()
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGKILL)
        try:
            replica.proc.wait(10)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError("a killed node hung on exit flushing -shm pages") from exc
        for reader in readers:
            try:
                reader.close()
            except sqlite3.Error:
                pass
        replica.stop()
