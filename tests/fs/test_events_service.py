"""`litefspy events` over real gRPC from an in-process store and mount."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from litefspy.api.events import EventHub, event_to_json
from litefspy.v1 import data_pb2 as pb
from tests.support.services_harness import Mounted, cli, make_db, mounted_node, run_sql


class EventReader:
    """`litefspy events` as a subprocess; `next()` parses its next output line."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.buffer = b""

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with trio.fail_after(timeout):
            while b"\n" not in self.buffer:
                chunk = await self.proc.stdout.receive_some()
                assert chunk, f"events ended: {self.buffer!r}"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event


async def _open_events(n: Mounted) -> EventReader:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "litefspy", "events", "--url", n.url],
        stdout=subprocess.PIPE,
    )
    return EventReader(proc)


def _pos(n: Mounted, name: str) -> tuple[str, str]:
    pos = n.store.get(name).pos  # type: ignore[union-attr]
    return f"{pos.txid:016x}", f"{pos.checksum:016x}"


async def test_events_init_tx_primary_change(tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    make_db(src, 50)
    async with mounted_node(tmp_path / "node") as n:
        for name in ("a.db", "b.db"):
            await trio.to_thread.run_sync(
                run_sql, n.db(name), "CREATE TABLE t (x); INSERT INTO t VALUES (1);", "wal"
            )
        reader = await _open_events(n)
        try:
            inits = [await reader.next(), await reader.next()]
            for event, name in zip(inits, ("a.db", "b.db"), strict=True):
                txid, checksum = _pos(n, name)
                assert event == {
                    "type": "init",
                    "db": name,
                    "data": {
                        "isPrimary": True,
                        "hostname": "node-a",
                        "txID": txid,
                        "postApplyChecksum": checksum,
                    },
                }

            # A commit through the mount.
            await trio.to_thread.run_sync(run_sql, n.db("a.db"), "INSERT INTO t VALUES (2);")
            tx = await reader.next()
            txid, checksum = _pos(n, "a.db")
            assert tx["type"] == "tx" and tx["db"] == "a.db"
            assert tx["data"]["txID"] == txid and tx["data"]["postApplyChecksum"] == checksum
            assert tx["data"]["pageSize"] == 4096 and tx["data"]["commit"] == 2
            assert tx["data"]["timestamp"].endswith("Z")

            # An import is one more transaction.
            res = await cli("import", "--name", "b.db", str(src), "--url", n.url)
            assert res.returncode == 0, res.stderr
            tx = await reader.next()
            assert (tx["db"], tx["data"]["txID"]) == ("b.db", _pos(n, "b.db")[0])

            # This node loses the primary role; later the primary moves elsewhere
            # without this node's role changing (seen by polling the hostname).
            n.node.set_role(False, "node-c")
            assert await reader.next() == {
                "type": "primaryChange",
                "data": {"isPrimary": False, "hostname": "node-c"},
            }
            n.node.primary_host = "node-d"
            assert await reader.next() == {
                "type": "primaryChange",
                "data": {"isPrimary": False, "hostname": "node-d"},
            }
        finally:
            reader.proc.kill()
            await reader.proc.wait()


async def test_events_without_databases_and_node_shutdown(tmp_path: Path) -> None:
    async with trio.open_nursery() as outer:
        done = trio.Event()
        urls: list[str] = []

        async def node() -> None:
            async with mounted_node(tmp_path / "node") as n:
                urls.append(n.url)
                await done.wait()

        outer.start_soon(node)
        while not urls:
            await trio.sleep(0.05)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "litefspy", "events", "--url", urls[0]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        reader = EventReader(proc)
        assert await reader.next() == {
            "type": "init",
            "data": {"isPrimary": True, "hostname": "node-a"},
        }
        done.set()  # the node stops: the command reports it and exits 1
        with trio.fail_after(20):
            assert await proc.wait() == 1
        assert proc.stderr is not None
        err = await proc.stderr.receive_some()
        assert err.startswith(b"litefspy: events: ") and err.count(b"\n") == 1, err


async def test_slow_subscriber_is_dropped_not_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Directly on the hub: a subscriber that does not drain its queue is cut off.
    monkeypatch.setattr("litefspy.api.events.SUBSCRIBER_BUFFER", 3)
    async with mounted_node(tmp_path / "node") as n:
        hub = EventHub(n.node)
        n.store.feed.subscribe(hub._on_commit)
        with hub.subscribe() as sub:
            for i in range(5):
                await trio.to_thread.run_sync(
                    run_sql, n.db("x.db"), f"CREATE TABLE t{i} (x);", "delete"
                )
            await trio.testing.wait_all_tasks_blocked()
            assert sub.overflowed
            received = [item async for item in sub.receive]
            assert len(received) == 3


def test_event_json_forms() -> None:
    tx = pb.Event(
        tx=pb.TxEvent(
            db="db",
            txid=0x27,
            post_apply_checksum=0x83B05248774CE767,
            page_size=4096,
            commit=2,
            timestamp_ms=1_700_000_000_123,
        )
    )
    assert json.dumps(event_to_json(tx)) == (
        '{"type": "tx", "db": "db", "data": {"txID": "0000000000000027", '
        '"postApplyChecksum": "83b05248774ce767", "pageSize": 4096, "commit": 2, '
        '"timestamp": "2023-11-14T22:13:20.123Z"}}'
    )
