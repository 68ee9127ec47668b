"""Point-in-time restore from a backup, and what a backup can restore (`backup list`).

A restore lists the database's objects, leaves out discarded branches,
picks the newest snapshot at or before the target and the fewest level
objects from there (layout.plan_restore), downloads them into a temporary
directory next to the output and applies them with the LTX codec, which
checks every file's checksums and that each continues the previous one
before the database file is written. The result is renamed into place only
when complete: an interrupted restore leaves nothing at PATH.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from litefspy.backup.layout import (
    Listing,
    Piece,
    newest_txid,
    parse_listing,
    plan_restore,
    split_branches,
    txid_at,
)
from litefspy.backup.target import Target
from litefspy.errors import BackupError, LTXError
from litefspy.ltx.apply import apply_files
from litefspy.ltx.files import fsync_dir

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def list_databases(target: Target) -> list[str]:
    """Names of the databases a backup holds (top-level folders)."""
    names = {key.split("/", 1)[0] for key, _ in target.objects() if "/" in key}
    return sorted(names)


def load_listing(target: Target, db: str) -> Listing:
    return parse_listing(db, target.objects(f"{db}/"))


@dataclass(frozen=True)
class RestoreResult:
    txid: int
    checksum: int
    files: int
    bytes: int


def restore_database(
    target: Target,
    db: str,
    out: Path,
    *,
    txid: int | None = None,
    timestamp_ms: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[list[Piece]], None] | None = None,
) -> RestoreResult:
    """Restore `db` into the file `out` (latest, or at `txid`, or at `timestamp_ms`)."""
    if out.exists() and not force:
        raise BackupError(f"{out} exists; pass --force to replace it")
    listing = load_listing(target, db)
    main, _ = split_branches(listing)
    if not main:
        raise BackupError(f"backup {target.spec.display} has no database {db!r}")
    newest = newest_txid(main)
    if timestamp_ms is not None:
        at = txid_at(main, timestamp_ms)
        if at is None:
            raise BackupError(f"{db}: nothing was committed at or before that time")
        txid = at
    goal = newest if txid is None else txid
    if goal > newest:
        raise BackupError(f"{db}: TXID {goal:016x} is past the newest backed up ({newest:016x})")
    try:
        plan = plan_restore(main, goal)
    except ValueError as exc:
        raise BackupError(f"{db}: cannot restore TXID {goal:016x}: {exc}") from None
    if on_plan is not None:
        on_plan(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.restore-", dir=out.parent))
    try:
        files: list[Path] = []
        total = 0
        for i, piece in enumerate(plan):
            local = work / f"{i:06d}.ltx"
            total += target.get_to(piece.key, local, progress)
            files.append(local)
        db_tmp = work / "database"
        try:
            got_txid, checksum = apply_files(db_tmp, files)
        except LTXError as exc:
            raise BackupError(f"{db}: backup object is unusable: {exc}") from None
        if got_txid != goal:
            raise BackupError(f"{db}: restore reached TXID {got_txid:016x}, not {goal:016x}")
        with open(db_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(db_tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("restored %s to TXID %016x from %d objects", db, goal, len(plan))
    return RestoreResult(goal, checksum, len(plan), total)


@dataclass(frozen=True)
class Restorable:
    """What `backup list` shows for one database."""

    name: str
    oldest_txid: int
    oldest_ms: int
    newest_txid: int
    newest_ms: int
    objects: int
    bytes: int
    branches: list[Piece]


def describe(target: Target, db: str) -> Restorable:
    listing = load_listing(target, db)
    main, branches = split_branches(listing)
    snaps = [p for p in main if p.is_snapshot]
    oldest = min(snaps, key=lambda p: p.max_txid) if snaps else None
    newest = max(main, key=lambda p: p.max_txid) if main else None
    return Restorable(
        name=db,
        oldest_txid=oldest.max_txid if oldest else 0,
        oldest_ms=oldest.timestamp_ms if oldest else 0,
        newest_txid=newest.max_txid if newest else 0,
        newest_ms=newest.timestamp_ms if newest else 0,
        objects=len(listing.pieces),
        bytes=sum(p.size for p in listing.pieces),
        branches=branches,
    )


def restore_into_data_dir(target: Target, dbs_dir: Path, name: str) -> RestoreResult:
    """Restore the latest state of `name` as a node's database, TXID included.

    The node then starts from the backup's position (the same TXID and
    checksum), so its history continues the backup's instead of starting over:
    the database file plus one LTX snapshot file at that TXID, which startup
    recovery checks against the file like any history.
    """
    from litefspy.ltx.apply import encode_database
    from litefspy.ltx.format import format_filename

    db_dir = dbs_dir / name
    (db_dir / "ltx").mkdir(parents=True, exist_ok=True)
    result = restore_database(target, name, db_dir / "database", force=True)
    encode_database(
        db_dir / "database",
        db_dir / "ltx" / format_filename(1, result.txid),
        txid=result.txid,
    )
    return result
