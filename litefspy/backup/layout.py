"""Object names in a backup, and which of them make up the restorable history.

```
<db>/snapshots/<max>-e<epoch>-t<ms>-c<post>.ltx   full state at TXID max (LTX snapshot)
<db>/l0/<min>-<max>-e<epoch>-t<ms>-c<post>.ltx    one per sync interval (merged LTX files)
<db>/l1/...  <db>/l2/...                     compactions of l0 (5 min) and l1 (1 h)
<db>/epochs/<epoch>-<txid>-<checksum>        a primary of lease epoch E began uploading
                                             at position (txid, checksum)
```

Every number is 16 hex digits, so names sort by TXID. `t` is the commit time
(LTX header timestamp, ms) of the object's last transaction and `c` its
post-apply checksum: restore by time, and a new primary checking where its
own history meets the backup, need no download. The epoch in every name
fences a deposed primary: it can never overwrite what the new one writes, and
the new one's epoch marker says where its history forked; objects of older
epochs that reach past that point hold transactions the cluster discarded:
they form a branch, listed, never used for a restore.

A database deleted on the primary is recorded in the chain like any
transaction: the deletion is an LTX file of commit 0, uploaded as a level-0
object of its own whose `c` is 8000000000000000 (the checksum of no pages,
which no live database has), so a listing shows that, and when, a database
was deleted without downloading anything. A restore to a point after it says
so; one before it restores as usual; a database made anew continues the
chain from the empty state's checksum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LEVELS = ("l0", "l1", "l2")
SNAPSHOTS = "snapshots"
EPOCHS = "epochs"
# The post-apply checksum of a database with no pages: a deleted one (LTX commit 0).
DELETED_CHECKSUM = 1 << 63

_HEX = "([0-9a-f]{16})"
_RANGE = re.compile(rf"^{_HEX}-{_HEX}-e{_HEX}-t{_HEX}-c{_HEX}\.ltx$")
_SNAPSHOT = re.compile(rf"^{_HEX}-e{_HEX}-t{_HEX}-c{_HEX}\.ltx$")
_EPOCH = re.compile(rf"^{_HEX}-{_HEX}-{_HEX}$")


@dataclass(frozen=True, order=True)
class Piece:
    """One LTX object: a snapshot (min 1) or a range of transactions at some level."""

    min_txid: int
    max_txid: int
    level: str
    epoch: int
    timestamp_ms: int
    checksum: int
    key: str
    size: int = 0

    @property
    def is_snapshot(self) -> bool:
        return self.level == SNAPSHOTS

    @property
    def is_deletion(self) -> bool:
        """Does the database not exist after this piece (its last transaction deleted it)?"""
        return not self.is_snapshot and self.checksum == DELETED_CHECKSUM


@dataclass(frozen=True)
class EpochMark:
    """A primary of `epoch` began uploading at (txid, checksum)."""

    epoch: int
    txid: int
    checksum: int
    key: str


def piece_key(db: str, level: str, *, lo: int, hi: int, epoch: int, ts: int, post: int) -> str:
    """The object name of TXIDs lo..hi (a snapshot when `level` is SNAPSHOTS: lo is 1)."""
    tail = f"e{epoch:016x}-t{ts:016x}-c{post:016x}.ltx"
    if level == SNAPSHOTS:
        return f"{db}/{SNAPSHOTS}/{hi:016x}-{tail}"
    return f"{db}/{level}/{lo:016x}-{hi:016x}-{tail}"


def epoch_key(db: str, epoch: int, txid: int, checksum: int) -> str:
    return f"{db}/{EPOCHS}/{epoch:016x}-{txid:016x}-{checksum:016x}"


@dataclass
class Listing:
    """Everything stored for one database."""

    pieces: list[Piece]
    marks: list[EpochMark]
    unknown: list[str]


def parse_listing(db: str, objects: list[tuple[str, int]]) -> Listing:
    """Sort a database's objects (keys relative to the backup root) into their kinds."""
    pieces: list[Piece] = []
    marks: list[EpochMark] = []
    unknown: list[str] = []
    for key, size in objects:
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != db:
            unknown.append(key)
            continue
        _, kind, name = parts
        if kind == SNAPSHOTS and (m := _SNAPSHOT.match(name)):
            txid, epoch, ts, post = (int(g, 16) for g in m.groups())
            pieces.append(Piece(1, txid, SNAPSHOTS, epoch, ts, post, key, size))
        elif kind in LEVELS and (m := _RANGE.match(name)):
            lo, hi, epoch, ts, post = (int(g, 16) for g in m.groups())
            pieces.append(Piece(lo, hi, kind, epoch, ts, post, key, size))
        elif kind == EPOCHS and (m := _EPOCH.match(name)):
            epoch, txid, checksum = (int(g, 16) for g in m.groups())
            marks.append(EpochMark(epoch, txid, checksum, key))
        elif not name.endswith(".tmp"):
            unknown.append(key)
    pieces.sort()
    marks.sort(key=lambda m: m.epoch)
    return Listing(pieces, marks, unknown)


def is_branch(piece: Piece, marks: list[EpochMark]) -> bool:
    """Does `piece` hold transactions a newer primary's history does not include?

    A primary of epoch E began at TXID T (its marker): anything an older
    epoch wrote past T was discarded by the cluster when E took over.
    """
    return any(piece.epoch < mark.epoch and piece.max_txid > mark.txid for mark in marks)


def split_branches(listing: Listing) -> tuple[list[Piece], list[Piece]]:
    """(pieces on the main history, pieces of discarded branches)."""
    main = [p for p in listing.pieces if not is_branch(p, listing.marks)]
    branches = [p for p in listing.pieces if is_branch(p, listing.marks)]
    return main, branches


def plan_restore(main: list[Piece], target_txid: int) -> list[Piece]:
    """The fewest pieces that rebuild TXID `target_txid`: newest snapshot at or
    before it, then at each step the piece reaching furthest without passing it.

    Raises ValueError naming the gap when the history does not reach the target.
    """
    snaps = [p for p in main if p.is_snapshot and p.max_txid <= target_txid]
    if not snaps:
        raise ValueError(f"no snapshot at or before TXID {target_txid:016x}")
    base = max(snaps, key=lambda p: (p.max_txid, p.epoch))
    plan = [base]
    pos = base.max_txid
    by_start: dict[int, list[Piece]] = {}
    for p in main:
        if not p.is_snapshot:
            by_start.setdefault(p.min_txid, []).append(p)
    while pos < target_txid:
        starting = by_start.get(pos + 1, [])
        options = [p for p in starting if p.max_txid <= target_txid]
        if not options and starting:
            over = min(starting, key=lambda p: p.max_txid)
            raise ValueError(
                f"it is not a restore point (one upload holds TXIDs {over.min_txid:016x}.."
                f"{over.max_txid:016x}); the nearest are {pos:016x} and {over.max_txid:016x}"
            )
        if not options:
            raise ValueError(f"the backup has a gap after TXID {pos:016x}")
        step = max(options, key=lambda p: (p.max_txid, p.epoch))
        plan.append(step)
        pos = step.max_txid
    return plan


def newest_txid(main: list[Piece]) -> int:
    return max((p.max_txid for p in main), default=0)


def deletion_at(main: list[Piece], txid: int) -> Piece | None:
    """The piece that deleted the database, if TXID `txid` is that deletion."""
    ends = [p for p in main if p.max_txid == txid and not p.is_snapshot]
    return next((p for p in ends if p.is_deletion), None)


def txid_at(main: list[Piece], timestamp_ms: int) -> int | None:
    """The newest TXID committed at or before `timestamp_ms` (None: before any)."""
    ends = [p.max_txid for p in main if p.timestamp_ms <= timestamp_ms]
    return max(ends) if ends else None


# How each level is built: l1 merges l0 every 5 minutes, l2 merges l1 every hour.
COMPACTION = {"l1": ("l0", 300.0), "l2": ("l1", 3600.0)}


def plan_compaction(main: list[Piece], level: str) -> list[Piece]:
    """The run of source-level pieces the next `level` piece should merge.

    Sources start right after the newest piece already at `level` (or at the
    first source when there is none) and must follow each other without a
    gap; fewer than two make no compaction (nothing would be gained).
    """
    source = COMPACTION[level][0]
    done = max((p.max_txid for p in main if p.level == level), default=0)
    pending = sorted(p for p in main if p.level == source and p.min_txid > done)
    run: list[Piece] = []
    for piece in pending:
        if run and piece.min_txid != run[-1].max_txid + 1:
            break
        run.append(piece)
    return run if len(run) >= 2 else []


def plan_retention(listing: Listing, now_ms: int, retention_ms: int) -> list[Piece]:
    """Pieces no restore point inside the retention window needs any more.

    The base is the newest snapshot taken at or before the window's start: it
    and everything after it stay; older snapshots, pieces ending at or before
    the base, and branch pieces older than the window go. A database deleted
    before the window began keeps only its deletion.
    """
    cutoff = now_ms - retention_ms
    main, branches = split_branches(listing)
    doomed = [p for p in branches if p.timestamp_ms < cutoff]
    end = max(main, key=lambda p: (p.max_txid, p.epoch), default=None)
    if end is not None and end.is_deletion and end.timestamp_ms < cutoff:
        # Deleted before the window began: no restore point in it has the database.
        # The deletion itself stays, so that `backup list` and restore can say so.
        return sorted(set(doomed + [p for p in main if p is not end]))
    bases = [p for p in main if p.is_snapshot and p.timestamp_ms <= cutoff]
    if bases:
        base = max(bases, key=lambda p: (p.max_txid, p.epoch))
        doomed += [p for p in main if p is not base and p.max_txid <= base.max_txid]
    return sorted(set(doomed))
