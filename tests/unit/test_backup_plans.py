"""Backup planning over simulated time: restore plans, compaction runs, retention, branches.

Synthetic listings (object names only) stand for a week of uploads with an
injected clock; the compaction of real objects is checked against restores
in tests/cluster/test_backup.py.
"""

from __future__ import annotations

import itertools
import random

import pytest

from litefspy.backup.layout import (
    DELETED_CHECKSUM,
    SNAPSHOTS,
    EpochMark,
    Listing,
    Piece,
    deletion_at,
    is_branch,
    parse_listing,
    piece_key,
    plan_compaction,
    plan_restore,
    plan_retention,
    split_branches,
    txid_at,
)

HOUR = 3_600_000
DAY = 24 * HOUR


def _piece(level: str, lo: int, hi: int, ts: int, epoch: int = 1) -> Piece:
    key = piece_key("app.db", level, lo=lo, hi=hi, epoch=epoch, ts=ts, post=hi | 1 << 63)
    return Piece(lo, hi, level, epoch, ts, hi | 1 << 63, key, 100)


def _week(seed: int = 0) -> tuple[list[Piece], int]:
    """Seven days of a primary: l0 every few minutes, l1 per 5 l0s, l2 per 12 l1s,
    a snapshot every day. Returns (pieces, now)."""
    rng = random.Random(seed)
    pieces = [_piece(SNAPSHOTS, 1, 10, 0)]
    txid, now = 10, 0
    l0s: list[Piece] = []
    l1s: list[Piece] = []
    next_snapshot = DAY
    while now < 7 * DAY:
        now += rng.randint(60_000, 600_000)
        n = rng.randint(1, 50)
        l0s.append(_piece("l0", txid + 1, txid + n, now))
        txid += n
        if len(l0s) == 5:
            l1s.append(_piece("l1", l0s[0].min_txid, l0s[-1].max_txid, now))
            pieces += l0s
            l0s = []
            if len(l1s) == 12:
                pieces.append(_piece("l2", l1s[0].min_txid, l1s[-1].max_txid, now))
                pieces += l1s
                l1s = []
        if now >= next_snapshot:
            pieces += l0s + l1s
            l0s, l1s = [], []
            # A snapshot at the newest TXID; l0/l1 runs start again after it.
            pieces.append(_piece(SNAPSHOTS, 1, txid, now))
            next_snapshot += DAY
    pieces += l0s + l1s
    return sorted(pieces), now


def test_restore_plan_uses_the_fewest_pieces_and_reaches_every_point() -> None:
    pieces, _ = _week()
    main = pieces
    ends = sorted({p.max_txid for p in main if not p.is_snapshot})
    for target in [*ends[::37], ends[-1]]:
        plan = plan_restore(main, target)
        assert plan[0].is_snapshot and plan[-1].max_txid == target
        for a, b in itertools.pairwise(plan):
            assert b.min_txid == a.max_txid + 1
        # A snapshot, then at most a day of l2, l1 and l0 steps.
        assert len(plan) <= 1 + 12 + 12 + 5, len(plan)
    # Between two l0 ends there is no restore point.
    with pytest.raises(ValueError, match="no snapshot"):
        plan_restore(main, 5)


def test_restore_by_time_picks_the_last_commit_at_or_before() -> None:
    pieces, _ = _week(1)
    l0 = [p for p in pieces if p.level == "l0"]
    probe = l0[len(l0) // 2]
    assert txid_at(pieces, probe.timestamp_ms) == probe.max_txid
    assert txid_at(pieces, probe.timestamp_ms - 1) < probe.max_txid  # type: ignore[operator]
    assert txid_at(pieces, -1) is None


def test_compaction_merges_the_pending_contiguous_run() -> None:
    pieces = [_piece(SNAPSHOTS, 1, 10, 0)] + [
        _piece("l0", 10 + i * 5 + 1, 10 + i * 5 + 5, i) for i in range(6)
    ]
    run = plan_compaction(pieces, "l1")
    assert [(p.min_txid, p.max_txid) for p in run] == [(11 + 5 * i, 15 + 5 * i) for i in range(6)]
    done = [*pieces, _piece("l1", 11, 40, 6)]
    assert plan_compaction(done, "l1") == []  # nothing pending: one leftover is not merged
    more = [*done, _piece("l0", 41, 45, 7), _piece("l0", 47, 50, 8)]  # a gap after 45
    assert plan_compaction(more, "l1") == []  # a run of one is not worth a merge
    more.append(_piece("l0", 46, 46, 9))
    assert [(p.min_txid, p.max_txid) for p in plan_compaction(more, "l1")] == [
        (41, 45),
        (46, 46),
        (47, 50),
    ]


@pytest.mark.parametrize("seed", range(3))
def test_retention_over_a_simulated_week(seed: int) -> None:
    pieces, now = _week(seed)
    retention = 3 * DAY
    listing = Listing(pieces, [], [])
    doomed = set(plan_retention(listing, now, retention))
    kept = [p for p in pieces if p not in doomed]
    assert doomed, "a week of uploads with 3 days of retention must expire something"
    cutoff = now - retention
    # Every restore point inside the window is still restorable from what is kept...
    inside = [p.max_txid for p in pieces if not p.is_snapshot and p.timestamp_ms >= cutoff]
    for target in inside:
        plan = plan_restore(kept, target)
        assert plan[-1].max_txid == target
    # ...and what went is only what the window's base snapshot makes useless.
    base = max(
        (p for p in pieces if p.is_snapshot and p.timestamp_ms <= cutoff), key=lambda p: p.max_txid
    )
    assert base in kept
    assert all(p.max_txid <= base.max_txid for p in doomed)
    assert min(p.timestamp_ms for p in kept) <= cutoff  # the base reaches back past the window


def test_a_deposed_primarys_uploads_past_the_fork_are_a_branch() -> None:
    old = [_piece(SNAPSHOTS, 1, 10, 0, epoch=1), _piece("l0", 11, 20, 1, epoch=1)]
    late = _piece("l0", 21, 25, 5, epoch=1)  # uploaded after epoch 2 took over at 20
    new = [_piece("l0", 21, 30, 6, epoch=2)]
    marks = [EpochMark(2, 20, 20 | 1 << 63, "app.db/epochs/x")]
    listing = Listing(sorted([*old, late, *new]), marks, [])
    main, branches = split_branches(listing)
    assert branches == [late] and is_branch(late, marks)
    assert plan_restore(main, 30)[-1] == new[0]
    assert plan_restore(main, 20)[-1] == old[-1]
    with pytest.raises(ValueError, match="not a restore point"):
        plan_restore(main, 25)  # TXID 25 exists only on the branch
    # Retention drops the branch once it is older than the window, never before.
    assert late not in plan_retention(listing, 5 + 10, 100)
    assert late in plan_retention(listing, 5 + 200, 100)


def test_listing_round_trips_object_names() -> None:
    p = _piece("l1", 5, 9, 1234, epoch=7)
    s = _piece(SNAPSHOTS, 1, 9, 99, epoch=7)
    listing = parse_listing(
        "app.db",
        [
            (p.key, 100),
            (s.key, 100),
            ("app.db/epochs/" + "0" * 15 + "7-" + "0" * 15 + "9-" + "8" + "0" * 14 + "9", 0),
            ("app.db/l0/garbage.ltx", 3),
            ("other.db/l0/x", 1),
        ],
    )
    assert listing.pieces == sorted([p, s])
    assert [(m.epoch, m.txid) for m in listing.marks] == [(7, 9)]
    assert listing.unknown == ["app.db/l0/garbage.ltx", "other.db/l0/x"]


def _deletion(lo: int, hi: int, ts: int) -> Piece:
    key = piece_key("app.db", "l0", lo=lo, hi=hi, epoch=1, ts=ts, post=DELETED_CHECKSUM)
    return Piece(lo, hi, "l0", 1, ts, DELETED_CHECKSUM, key, 100)


def test_a_deletion_is_read_from_the_name_and_retention_keeps_only_it_once_old() -> None:
    pieces, now = _week()
    end = max(p.max_txid for p in pieces)
    gone = _deletion(end + 1, end + 1, now + 1000)
    (parsed,) = parse_listing("app.db", [(gone.key, 100)]).pieces
    assert parsed.is_deletion and not pieces[-1].is_deletion
    main = [*pieces, gone]
    assert deletion_at(main, end + 1) == parsed
    assert deletion_at(main, end) is None
    # Every point before the deletion still restores; the deletion is the newest.
    assert plan_restore(main, end)[-1].max_txid == end
    assert txid_at(main, now + 1000) == end + 1
    listing = Listing(main, [], [])
    week = 7 * DAY
    # Inside the window: retention works as usual (the deletion stays).
    kept = set(main) - set(plan_retention(listing, now + 1000 + DAY, week))
    assert gone in kept and len(kept) > 1
    # Once the deletion is older than the window, only it remains.
    doomed = plan_retention(listing, now + 1000 + week + 1, week)
    assert set(main) - set(doomed) == {gone}


def test_a_txid_inside_one_upload_names_the_nearest_restore_points() -> None:
    main = [_piece(SNAPSHOTS, 1, 4, 0), _piece("l0", 5, 7, 10)]
    with pytest.raises(ValueError, match=r"not a restore point .* nearest are 0+4 and 0+7"):
        plan_restore(main, 6)
    assert [p.max_txid for p in plan_restore(main, 7)] == [4, 7]
