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

import datetime as dt
import errno
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from litefspy.backup.layout import (
    Listing,
    Piece,
    deletion_at,
    newest_txid,
    parse_listing,
    plan_restore,
    split_branches,
    txid_at,
)
from litefspy.backup.target import Target
from litefspy.errors import BackupError, LTXError
from litefspy.fsutil import install
from litefspy.ltx.apply import consecutive_runs, write_page_batches
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.decoder import Decoder, PageBatch

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def iso_time(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC ('-' for none)."""
    if not ms:
        return "-"
    stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    if (gone := deletion_at(main, goal)) is not None:
        raise BackupError(
            f"{db} was deleted at {iso_time(gone.timestamp_ms)} (TXID {goal:016x}); "
            "restore an earlier point with --timestamp or --txid"
        )
    try:
        plan = plan_restore(main, goal)
    except ValueError as exc:
        raise BackupError(f"{db}: cannot restore TXID {goal:016x}: {exc}") from None
    if on_plan is not None:
        on_plan(plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.restore-", dir=out.parent))
    try:
        db_tmp = work / "database"
        try:
            got_txid, checksum, total = _apply_pieces(target, db, plan, db_tmp, progress)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            need = max(p.size for p in plan)  # compressed: the database is at least this
            raise BackupError(
                f"{db}: no space left on the device of {out.parent} for the restored "
                f"database (at least {need / (1 << 20):.0f} MiB); nothing was written there"
            ) from None
        if got_txid != goal:
            raise BackupError(f"{db}: restore reached TXID {got_txid:016x}, not {goal:016x}")
        install(db_tmp, out, sync_file=False)  # _apply_pieces fsynced it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("restored %s to TXID %016x from %d objects", db, goal, len(plan))
    return RestoreResult(goal, checksum, len(plan), total)


class _StreamReader:
    """A read-only file over an object's download stream (no copy on disk).

    `read(n)` hands out the downloaded chunk in hand (a whole chunk, when
    asked for at least that much, is given as it is): short reads are fine
    for the LTX decoder, and no buffer copies every byte once more.
    """

    def __init__(self, chunks: Iterator[bytes], progress: Progress | None) -> None:
        self._chunks = chunks
        self._chunk = b""
        self._pos = 0
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        if self._pos == len(self._chunk):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._chunk, self._pos = chunk, 0
            if self._progress is not None:
                self._progress(len(chunk))
        pos = self._pos
        if pos == 0 and (n < 0 or n >= len(self._chunk)):
            self._pos = len(self._chunk)
            return self._chunk
        end = len(self._chunk) if n < 0 else min(pos + n, len(self._chunk))
        self._pos = end
        return self._chunk[pos:end]


def _apply_pieces(
    target: Target, db: str, plan: list[Piece], out: Path, progress: Progress | None
) -> tuple[int, int, int]:
    """Stream every piece of `plan` into the new database file `out`, in one pass.

    Each object is decoded as it downloads (the decoder checks its page
    order and, at its end, its file checksum); before its first page it
    must continue the previous one (TXID and pre-apply checksum), and after
    its last the database's checksum must be its post-apply checksum. `out`
    is a private temporary file: anything wrong stops the restore before
    the caller renames it into place. Returns (TXID, checksum, bytes read).
    """
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    out_file = open(fd, "r+b", closefd=False)  # noqa: SIM115 - closed with fd below
    sums: PageChecksums | None = None
    txid = 0
    total = 0
    deleted_ms: int | None = None
    writeback = _Writeback(fd)

    def counted(n: int) -> None:
        nonlocal total
        total += n
        if progress is not None:
            progress(n)

    try:
        for piece in plan:
            reader = cast(BinaryIO, _StreamReader(target.stream(piece.key), counted))
            try:
                dec = Decoder(reader)
                header = dec.header
                if header.is_snapshot:
                    sums = PageChecksums(header.page_size)
                elif sums is None or header.min_txid != txid + 1:
                    raise LTXError(f"does not continue TXID {txid:016x}")
                elif header.pre_apply_checksum != sums.total:
                    raise LTXError(f"does not continue the checksum {sums.total:016x}")
                elif sums.page_size != header.page_size:
                    if sums.page_count:  # only a database made anew may change it
                        raise LTXError(f"changes the page size to {header.page_size}")
                    sums = PageChecksums(header.page_size)
                write_page_batches(
                    out_file,
                    _summed(dec.page_batches(), sums, writeback),
                    header.page_size,
                    header.commit,
                    zero_lock_page=False,
                )
                sums.truncate(header.commit)
                if dec.trailer.post_apply_checksum != sums.total:
                    raise LTXError(
                        f"post-apply checksum {dec.trailer.post_apply_checksum:016x} does not "
                        f"match the restored pages ({sums.total:016x})"
                    )
            except LTXError as exc:
                raise BackupError(f"{db}: backup object {piece.key} is unusable: {exc}") from None
            txid = header.max_txid
            deleted_ms = header.timestamp if header.commit == 0 else None
        if deleted_ms is not None:
            # A deletion inside a merged object that ends with it (the listing
            # could not tell): the database does not exist at this point.
            raise BackupError(
                f"{db} was deleted at {iso_time(deleted_ms)} (TXID {txid:016x}); "
                "restore an earlier point with --timestamp or --txid"
            )
        writeback.finish()
        os.fsync(fd)
    finally:
        writeback.finish(check=False)
        out_file.close()
        os.close(fd)
    assert sums is not None
    return txid, sums.total, total


# A restore writes the database far faster than the kernel starts writing it
# back on its own (a GiB stays dirty), so the final fsync used to wait for all
# of it at once (~1 s a GiB here, with the CPU idle). Every this many bytes,
# what is written so far is synced in a thread while decoding goes on.
WRITEBACK_BYTES = 128 << 20


class _Writeback:
    """fdatasync of the file being restored, in the background, as it grows."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._since = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, n: int) -> None:
        self._since += n
        if self._since < WRITEBACK_BYTES or (self._thread and self._thread.is_alive()):
            return
        self._since = 0
        self._thread = threading.Thread(target=self._sync, name="restore writeback", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:  # reported by finish(): a later fsync may not see it again
            self._error = exc

    def finish(self, *, check: bool = True) -> None:
        """Wait for the sync under way; raise what any background sync met."""
        if self._thread is not None:
            self._thread.join()
        if check and self._error is not None:
            raise self._error


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
    deleted: Piece | None = None  # the deletion, when the database's last act was one

    @property
    def restorable(self) -> bool:
        """Does the newest point have the database (it was not deleted)?"""
        return self.deleted is None and self.newest_txid > 0


def describe(target: Target, db: str) -> Restorable:
    listing = load_listing(target, db)
    main, branches = split_branches(listing)
    snaps = [p for p in main if p.is_snapshot]
    oldest = min(snaps, key=lambda p: p.max_txid) if snaps else None
    newest = max(main, key=lambda p: (p.max_txid, p.epoch)) if main else None
    return Restorable(
        name=db,
        oldest_txid=oldest.max_txid if oldest else 0,
        oldest_ms=oldest.timestamp_ms if oldest else 0,
        newest_txid=newest.max_txid if newest else 0,
        newest_ms=newest.timestamp_ms if newest else 0,
        objects=len(listing.pieces),
        bytes=sum(p.size for p in listing.pieces),
        branches=branches,
        deleted=deletion_at(main, newest.max_txid) if newest else None,
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


def record_deletion_in_data_dir(target: Target, dbs_dir: Path, name: str, deletion: Piece) -> None:
    """Give a node the history of a database the backup says was deleted.

    No database file: only the deletion itself (an LTX file of commit 0, with
    no pages), so that the node knows the database at that TXID, deleted, and
    a database made anew under the same name continues the same history
    (and the same backup) instead of starting over at TXID 1 beneath it.
    """
    from litefspy.ltx.decoder import verify_file
    from litefspy.ltx.format import format_filename

    ltx_dir = dbs_dir / name / "ltx"
    ltx_dir.mkdir(parents=True, exist_ok=True)
    final = ltx_dir / format_filename(deletion.min_txid, deletion.max_txid)
    tmp = final.with_name(final.name + ".tmp")
    target.get_to(deletion.key, tmp)
    try:
        header, _ = verify_file(tmp)
    except LTXError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"{name}: backup object {deletion.key} is unusable: {exc}") from None
    if header.commit != 0:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"{name}: backup object {deletion.key} is not a deletion")
    install(tmp, final)


def _summed(
    batches: Iterator[PageBatch], sums: PageChecksums, writeback: _Writeback
) -> Iterator[tuple[list[int], list[Any]]]:
    """`batches` of pages, their checksums recorded in `sums` on the way.

    Consecutive pages' checksums are recorded together (`set_run`): a
    restore is CPU-bound, and a snapshot is one long run.
    """
    for pgnos, pages, checksums in batches:
        for i, j in consecutive_runs(pgnos, len(pgnos)):
            sums.set_run(pgnos[i], checksums[i:j])
        yield pgnos, pages
        writeback.wrote(len(pgnos) * sums.page_size)
