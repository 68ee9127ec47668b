"""`litefspy events` against real node processes."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from typing import Any

from tests.support.cluster import connect, replica_of, wait_same_pos
from tests.support.nodes import NodeProcess


class Events:
    """`litefspy events --url URL` in a subprocess, its lines parsed by a reader thread."""

    def __init__(self, url: str, command: tuple[str, ...] = ("events",)) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "litefspy", *command, "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next(self, timeout: float = 15.0) -> dict[str, Any]:
        try:
            event: dict[str, Any] = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError("no event within the timeout") from None
        return event

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_events_on_primary_and_replica(node_factory) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica: NodeProcess = replica_of(node_factory, primary).start()
    conn = connect(primary.db("app.db"), "wal")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    wait_same_pos(primary, [replica], "app.db")

    on_primary, on_replica = Events(primary.url), Events(replica.url)
    try:
        txid, checksum = primary.pos("app.db")
        init = {"txID": f"{txid:016x}", "postApplyChecksum": f"{checksum:016x}"}
        assert on_primary.next() == {
            "type": "init",
            "db": "app.db",
            "data": {"isPrimary": True, "hostname": "primary", **init},
        }
        assert on_replica.next() == {
            "type": "init",
            "db": "app.db",
            "data": {"isPrimary": False, "hostname": "primary", **init},
        }

        conn = connect(primary.db("app.db"))
        for i in range(3):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.close()
        wait_same_pos(primary, [replica], "app.db")
        for events in (on_primary, on_replica):
            seen = [events.next() for _ in range(3)]
            assert [e["type"] for e in seen] == ["tx"] * 3
            assert [int(e["data"]["txID"], 16) for e in seen] == [txid + 1, txid + 2, txid + 3]
            last = seen[-1]["data"]
            assert (int(last["txID"], 16), int(last["postApplyChecksum"], 16)) == primary.pos(
                "app.db"
            )
            assert last["pageSize"] == 4096 and last["commit"] >= 2

        # The primary goes away: the replica reports that it lost its primary.
        primary.stop()
        assert on_replica.next(timeout=30) == {
            "type": "primaryChange",
            "data": {"isPrimary": False, "hostname": ""},
        }
    finally:
        on_primary.close()
        on_replica.close()


def test_status_watch_prints_status_then_follows_events(node_factory) -> None:
    primary: NodeProcess = node_factory("primary").start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    watch = Events(primary.url, ("status", "--watch"))
    try:
        status = watch.next()
        assert status["role"] == "primary" and status["node"]["hostname"] == "primary"
        txid = primary.pos("app.db")[0]
        assert [d["txid"] for d in status["databases"]] == [f"{txid:016x}"]
        assert watch.next()["type"] == "init"
        conn = connect(primary.db("app.db"))
        conn.execute("INSERT INTO t VALUES (1)")
        conn.close()
        tx = watch.next()
        assert tx["type"] == "tx" and int(tx["data"]["txID"], 16) == txid + 1
    finally:
        watch.close()
