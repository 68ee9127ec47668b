"""A simulated week of backups: the real uploader on an injected clock.

Real SQLite commits (through tests/support/store_vfs.py) into a store while
the uploader uploads, compacts (l1 every 5 minutes, l2 every hour), snapshots
(daily) and expires (72 h) against a target, all on a clock the caller's
simulation moves forward, commit timestamps included. Used by
tests/store/test_backup_week.py and by `make bench` (W9, a point two days back).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from litefspy.backup.target import Target
from litefspy.backup.uploader import Uploader
from litefspy.store import capture
from litefspy.store.store import Store
from tests.support.store_vfs import StoreVFS

HOUR = 3600.0
DAY = 24 * HOUR
STEP = 40 * 60.0  # simulated time between two rounds of commits
RETENTION = 72 * HOUR


class Clock:
    """Simulated wall-clock time, for the uploader and for commit timestamps."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:  # stands in for the time module inside capture
        return self.now


@dataclass
class Week:
    """What the simulation committed and uploaded."""

    uploader: Uploader
    clock: Clock
    rows: int = 0
    rows_at: dict[int, int] = field(default_factory=dict)  # TXID -> rows committed by it
    committed_ms: dict[int, int] = field(default_factory=dict)


@contextmanager
def simulated_clock(start: float = 1_800_000_000.0) -> Iterator[Clock]:
    """A clock that commit timestamps follow too, for the duration of the block."""
    clock = Clock(start)
    saved = capture.time
    capture.time = clock  # type: ignore[assignment]
    try:
        yield clock
    finally:
        capture.time = saved


def simulate_week(tmp: Path, target: Target, clock: Clock, days: float = 7.5) -> Week:
    """Commit single rows two at a time every STEP for `days`, backing up as a primary.

    A week and a half day: two days before the end is then half a day after
    the newest daily snapshot before it, not at one.
    """
    store = Store(tmp / "data")
    store.open()
    uploader = Uploader(
        store, target, epoch=lambda: 1, snapshot_interval=DAY, retention=RETENTION, clock=clock
    )
    week = Week(uploader, clock)
    vfs = StoreVFS(store, f"week-{id(week)}")
    conn = vfs.connect("app.db")
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB)")
    db = store.get("app.db")
    assert db is not None
    end = clock.now + days * DAY

    async def run() -> None:
        while clock.now < end:
            for _ in range(2):  # two uploads a round: l1 has runs to merge
                week.rows += 1
                conn.execute("INSERT INTO t VALUES (?, randomblob(300))", (week.rows,))
                week.rows_at[db.pos.txid] = week.rows
                week.committed_ms[db.pos.txid] = int(clock.now * 1000)
                await uploader.sync_all()
                clock.now += 60
            await uploader.maintain()
            clock.now += STEP - 120

    try:
        trio.run(run)
        state = uploader.totals.per_db["app.db"]
        assert state.last_error == "", state.last_error
        assert state.uploaded == db.pos
    finally:
        conn.close()
        store.close()
    return week
