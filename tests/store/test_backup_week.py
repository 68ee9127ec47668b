"""A simulated week of backups: the real uploader, compaction and retention on an injected clock.

Real SQLite commits into a store (tests/support/store_vfs.py) while the
uploader uploads, compacts (l1 every 5 minutes, l2 every hour), snapshots
(daily) and expires (72 h) against a file:// target, all on a clock the test
moves forward, commits included. At the end, every restore point inside the
window restores to exactly the rows committed by then, a point two days back
needs few objects, and what is older than the window (and no restore point
needs) is gone.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from litefspy.backup.layout import parse_listing, plan_restore, split_branches, txid_at
from litefspy.backup.restore import restore_database
from litefspy.backup.target import Target
from litefspy.config import parse_target
from litefspy.errors import BackupError
from tests.support.backup_week import DAY, RETENTION, simulate_week, simulated_clock

pytestmark = pytest.mark.slow


def _rows(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count, top = conn.execute("SELECT count(*), coalesce(max(n), 0) FROM t").fetchone()
        assert count == top  # rows 1..n, nothing torn or doubled
        return int(count)
    finally:
        conn.close()


def test_a_week_of_uploads_compaction_and_retention(tmp_path: Path) -> None:
    target = Target(parse_target(f"file://{tmp_path}/backup"))
    with simulated_clock() as clock:
        week = simulate_week(tmp_path, target, clock)
    rows_at, committed_ms, rows = week.rows_at, week.committed_ms, week.rows

    main, _ = split_branches(parse_listing("app.db", target.objects("app.db/")))
    levels = {level: sum(p.level == level for p in main) for level in ("l0", "l1", "l2")}
    snapshots = sorted(p.timestamp_ms for p in main if p.is_snapshot)
    assert levels["l1"] and levels["l2"], levels
    now_ms = int(clock.now * 1000)
    cutoff = now_ms - int(RETENTION * 1000)
    # Retention: one snapshot at or before the window's start is the base; nothing
    # older than it is left, and the window is covered from it on.
    assert snapshots[0] <= cutoff < snapshots[0] + int(DAY * 1000) + 1
    assert min(p.timestamp_ms for p in main) >= snapshots[0]
    uploads = len(rows_at)
    assert levels["l0"] < uploads * 0.75  # about 4 of the 7 days are left

    # Restore points: latest, two days back, and a sample inside the window.
    out = tmp_path / "restored.db"
    res = restore_database(target, "app.db", out)
    assert _rows(out) == rows
    two_days = txid_at(main, now_ms - int(2 * DAY * 1000))
    assert two_days is not None
    plan = plan_restore(main, two_days)
    hours = (plan[-1].timestamp_ms - plan[0].timestamp_ms) / 3_600_000
    # The snapshot, about one l2 object per hour since it, then the l1 and l0
    # objects of the last hour: not one object per upload (~36 here).
    assert plan[0].is_snapshot and 6 <= hours <= 24
    assert len(plan) <= 1 + hours + 1 + 12 + 2, [p.level for p in plan]
    res = restore_database(target, "app.db", out, txid=two_days, force=True)
    assert res.txid == two_days and _rows(out) == rows_at[two_days]
    inside = [t for t in rows_at if committed_ms[t] >= cutoff]
    for txid in random.Random(7).sample(inside, 8):
        res = restore_database(target, "app.db", out, txid=txid, force=True)
        assert _rows(out) == rows_at[txid], f"TXID {txid}"
    # Older than the base snapshot: no longer restorable.
    gone = min(rows_at)
    with pytest.raises(BackupError, match="cannot restore"):
        restore_database(target, "app.db", out, txid=gone, force=True)
