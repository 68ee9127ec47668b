"""Recovery: bring a database directory to a consistent state (DESIGN.md decision 6).

At startup (`recover`): promote synced temp files, drop a torn tail, roll back
hot journals, fold the WAL in, then make the database file agree with its LTX
history (trust a clean stop, roll forward, re-apply the newest file, or
recapture what SQLite committed). On a replica (`settle`): leave only committed
state before LTX files are applied to the database file. At a clean stop
(`write_clean_record`): what the next start may trust.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from litefspy.errors import LTXError, RecoveryError, SQLiteFormatError
from litefspy.fsutil import fsync_dir
from litefspy.logs import kv
from litefspy.ltx.apply import apply_ltx, write_pages
from litefspy.ltx.checksum import PageChecksums
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.format import Header, Trailer, lock_pgno, parse_filename
from litefspy.ltx.peek import post_apply_checksum, read_ends
from litefspy.progress import STARTUP_CHECK
from litefspy.sqlite.journal import (
    JOURNAL_HEADER_SIZE,
    is_hot_journal,
    parse_journal_header,
    read_super_journal_name,
    rollback_journal,
)
from litefspy.sqlite.wal import WAL_HEADER_SIZE, WALReader, parse_wal_header
from litefspy.store import capture, cleanstop
from litefspy.store.files import CLEAN_RECORD
from litefspy.store.types import FileKind, Position

if TYPE_CHECKING:
    from litefspy.store.database import Database

log = logging.getLogger(__name__)


def recover(db: Database) -> None:
    """Bring the directory to a consistent state at startup (DESIGN.md decision 6)."""
    db.ensure_dirs()
    _promote_synced_tmp_files(db)
    saved = cleanstop.take(db.dir)
    files, dropped, ends = _drop_torn_tail(db, db.ltx_files(), saved)
    newest = files[-1][2] if files else None
    # Read once: the newest file's verified-file record (cleanstop.note_verified).
    recorded = newest is not None and cleanstop.was_verified(db.dir, newest)
    header = trailer = None
    if newest is not None:
        try:
            if ends is not None:
                header, trailer = ends  # verified just now
            elif (saved is not None and saved.ltx_unchanged(newest)) or recorded:
                # Verified when written (or at an earlier start) and fsynced since.
                header, trailer = read_ends(newest)
            else:
                header, trailer = verify_file(newest)
        except LTXError as exc:
            raise RecoveryError(
                f"database {db.name}: newest LTX file {newest} is invalid ({exc}); "
                "it holds the last committed transaction, so litefspy will not guess. "
                "Restore it from a replica's ltx/ directory, or move "
                f"{db.dir} aside and re-import the database"
            ) from exc
    clean = _take_clean_record(db)
    journal = db.path(FileKind.JOURNAL)
    rolled_back = False
    if journal.exists():
        if is_hot_journal(journal, db.db_path, db.super_journal_exists):
            restored = rollback_journal(journal, db.db_path)
            rolled_back = True
            log.info(
                "rolled back hot journal: its transaction was never committed %s",
                kv(db=db.name, pages=restored),
            )
        elif _names_super_journal(journal):
            # A multi-database commit completed (its super-journal is gone) before
            # this journal was invalidated: SQLite keeps the transaction, so the
            # database is ahead of its history and is recaptured below.
            rolled_back = True
            log.info(
                "journal of a committed multi-database transaction finalized %s",
                kv(db=db.name),
            )
        journal.unlink()
    wal_beyond = _recover_wal(db, header)
    db.path(FileKind.SHM).unlink(missing_ok=True)
    if header is None or trailer is None:
        _adopt_existing_file(db)
        return
    db.pos = Position(header.max_txid, trailer.post_apply_checksum)
    if header.commit == 0:
        if db.db_path.exists() and db.db_path.stat().st_size > 0:
            raise RecoveryError(
                f"database {db.name}: newest LTX {newest} deletes the database but "
                f"{db.db_path} still has data; move it aside to continue"
            )
        db.db_path.unlink(missing_ok=True)
        db.checksums = None
        return
    assert newest is not None
    expected = trailer.post_apply_checksum
    quiet = not (rolled_back or dropped or wal_beyond or db.apply_marker.exists())
    if (quiet and _trust_clean_stop(db, saved, header, expected)) or _roll_forward(
        db, files, header.page_size, expected
    ):
        outcome = "history"
    elif db.apply_marker.exists():
        # litefspy itself was writing this file's pages (replica apply, import,
        # forwarded commit) when it stopped: the file is the truth.
        _reapply_newest(db, newest, header.page_size, expected)
        outcome = "history"
    elif rolled_back or dropped or wal_beyond or _is_clean_state(db, clean, header):
        # SQLite moved the file on, and its files are the authority for what
        # it committed: a rolled-back transaction reused free-list pages, or
        # the LTX files of the last commits were cut short or lost.
        _recapture(db, newest, header.page_size, dropped)
        outcome = "recaptured"
    else:
        # No sign that SQLite changed it: damage (the newest file rewrites
        # the pages it covers; anything else is refused, untouched).
        _reapply_newest(db, newest, header.page_size, expected)
        outcome = "history"
    db.end_apply()
    if dropped and outcome == "history":
        log.warning(
            "transactions lost: their LTX files were cut short by a crash and the "
            "database files do not have them either (never durable) %s",
            kv(db=db.name, txids=_txid_ranges(dropped), pos=db.pos),
        )
    try:
        db.read_db_header(db.db_reader())
    except SQLiteFormatError:
        pass
    if not recorded:
        # Good as checked above: a later start after a crash need not decode it again.
        cleanstop.note_verified(db.dir, newest)


def _names_super_journal(journal: Path) -> bool:
    with open(journal, "rb") as f:
        if parse_journal_header(f.read(JOURNAL_HEADER_SIZE)) is None:
            return False
        return read_super_journal_name(f) is not None


def write_clean_record(db: Database) -> None:
    """At a clean stop: the position the files are at (startup compares it), and
    the page checksums when the database file is exactly at that position
    (the next start then skips re-reading it: see store/cleanstop.py)."""
    if db.pos.txid == 0:
        return
    tmp = db.dir / (CLEAN_RECORD + ".tmp")
    tmp.write_text(f"{db.pos.txid:016x}/{db.pos.checksum:016x}\n")
    os.rename(tmp, db.dir / CLEAN_RECORD)
    checksums = db.checksums
    if checksums is None or checksums.total != db.pos.checksum or not _file_is_state(db):
        return
    files = db.ltx_files()
    if files and files[-1][1] == db.pos.txid:
        cleanstop.save(db.dir, db.pos.txid, checksums, db.db_path, files[-1][2])


def _file_is_state(db: Database) -> bool:
    """The database file alone holds the committed state: no transaction under
    way, no journal, no WAL frames (WAL commits live in the WAL until a
    checkpoint), no litefspy apply in progress."""
    if db.journal_active or db.dirty or db.apply_marker.exists():
        return False
    if db.path(FileKind.JOURNAL).exists():
        return False
    wal = cleanstop.FileStamp.of(db.path(FileKind.WAL))
    return wal is None or wal.size <= WAL_HEADER_SIZE


def _trust_clean_stop(
    db: Database, saved: cleanstop.CleanSums | None, newest: Header, expected: int
) -> bool:
    """Adopt the page checksums saved at the clean stop if the files are untouched."""
    if saved is None or saved.txid != newest.max_txid or saved.checksum != expected:
        return False
    sums = saved.checksums
    stamp = cleanstop.FileStamp.of(db.db_path)
    if (
        stamp != saved.database
        or sums.page_size != newest.page_size
        or sums.page_count != newest.commit
        or stamp.size != sums.page_count * sums.page_size
    ):
        log.info("database changed since the clean stop; checking it in full %s", kv(db=db.name))
        return False
    db.checksums = sums
    log.debug("startup check skipped: untouched since a clean stop %s", kv(db=db.name))
    return True


def _take_clean_record(db: Database) -> Position | None:
    """The position written at the last clean stop (consumed: a crash leaves none)."""
    path = db.dir / CLEAN_RECORD
    try:
        txid, checksum = path.read_text().strip().split("/")
        pos = Position(int(txid, 16), int(checksum, 16))
    except (OSError, ValueError):
        pos = None
    path.unlink(missing_ok=True)
    return pos


def _is_clean_state(db: Database, clean: Position | None, newest: Header) -> bool:
    """The node stopped cleanly at a later TXID than the history now ends at, and
    the database is exactly at that state: the LTX files after it were lost."""
    if clean is None or clean.txid <= newest.max_txid:
        return False
    fd = db.db_reader()
    size = os.fstat(fd).st_size
    if size % newest.page_size:
        return False
    return checksums_of(fd, newest.page_size, size // newest.page_size).total == (clean.checksum)


def _recapture(
    db: Database, newest: Path, history_page_size: int, dropped: list[tuple[int, int]]
) -> None:
    """The database file is not at any state of its LTX history: record it as it is.

    After a crash SQLite's files say what was committed: a hot journal has been
    rolled back and the WAL folded in. The file can differ from the history
    without anything being wrong: SQLite does not journal free-list pages it
    reuses, so a rolled-back transaction leaves new bytes in them; or the LTX
    file of the last commit was lost or cut short after the commit reached
    the database. Rolling the file back to the history would undo a commit,
    so if SQLite finds the file sound its whole state becomes the next TXID
    (every page: which ones differ is unknown), which replicas apply like any
    transaction. A file SQLite finds corrupt is left untouched, offline.
    """
    fd = db.db_reader()
    try:
        page_size, commit = db.read_db_header(fd)
    except SQLiteFormatError as exc:
        raise RecoveryError(
            f"database {db.name}: {db.db_path} differs from its LTX history and is "
            f"not a valid SQLite database ({exc}); it stays offline, untouched. Restore it "
            f"from a replica (`litefspy export` there, then `litefspy import`)"
        ) from None
    problem = _quick_check(db.db_path)
    if problem is not None:
        raise RecoveryError(
            f"database {db.name}: {db.db_path} differs from its LTX history (newest "
            f"{newest.name}) and SQLite's quick_check fails ({problem}); it stays offline, "
            f"untouched. Restore it from a replica, or move {db.dir} aside"
        )
    last = db.pos
    if page_size != history_page_size:
        raise RecoveryError(
            f"database {db.name}: {db.db_path} has page size {page_size}, its LTX "
            f"history another; it stays offline. Re-import it with `litefspy import`"
        )
    record_whole_file(db, fd, page_size, commit, notify=False)
    why = (
        f"the LTX files of TXIDs {_txid_ranges(dropped)} were cut short by a crash"
        if dropped
        else "free-list pages reused by a rolled-back transaction, or a lost LTX file"
    )
    log.warning(
        "database file differs from its LTX history (%s); SQLite's quick_check passes, so "
        "its state is recorded as the next transaction; nothing was lost %s",
        why,
        kv(db=db.name, after=f"{last.txid:016x}", pos=db.pos),
    )


def _roll_forward(
    db: Database, files: list[tuple[int, int, Path]], page_size: int, expected: int
) -> bool:
    """Bring the database forward along its LTX history; True if it now matches.

    WAL commits are recorded before their LTX file is fsynced (see capture.write_ltx),
    so after a power loss the database (with its surviving WAL frames) can be
    at the state of an older LTX file than the newest. Find that file by its
    post-apply checksum and re-apply the ones after it, in order, each checked
    against its pre-apply checksum.
    """
    fd = db.db_reader()
    size = os.fstat(fd).st_size
    if size % page_size:
        return False
    checksums = _checksums_with_progress(db, fd, page_size, size // page_size)
    if checksums.total == expected:
        db.checksums = checksums
        return True
    start = None
    for i in range(len(files) - 2, -1, -1):
        if post_apply_checksum(files[i][2]) == checksums.total:
            start = i + 1
            break
    if start is None:
        return False
    with os.fdopen(os.dup(fd), "r+b") as db_file:
        for _, _, path in files[start:]:
            with open(path, "rb") as f:
                apply_ltx(db_file, f, checksums)
        db_file.flush()
        os.fsync(db_file.fileno())
    db.checksums = checksums
    if checksums.total != expected:
        return False
    # Nothing was lost: the LTX files had every write the file missed.
    log.info(
        "database file was behind its LTX history (its last writes had not reached "
        "the disk); rolled forward from the LTX files %s",
        kv(db=db.name, files=len(files) - start, pos=db.pos),
    )
    return True


def _promote_synced_tmp_files(db: Database) -> None:
    """A valid .tmp LTX file was synced before its rename: keep it, else drop it."""
    for tmp in sorted(db.ltx_dir.glob("*.ltx.tmp")):
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        try:
            verify_file(tmp)
            parse_filename(final.name)
        except LTXError:
            tmp.unlink()
            continue
        if final.exists():
            tmp.unlink()
        else:
            os.rename(tmp, final)
            log.info("recovered LTX file whose rename was lost %s", kv(db=db.name, file=final.name))
    fsync_dir(db.ltx_dir)


def _drop_torn_tail(
    db: Database, files: list[tuple[int, int, Path]], saved: cleanstop.CleanSums | None = None
) -> tuple[list[tuple[int, int, Path]], list[tuple[int, int]], tuple[Header, Trailer] | None]:
    """Remove newest LTX files that a crash cut short; return the rest, what went,
    and the newest file's header and trailer if it was verified here.

    A WAL commit's LTX file is fsynced only when the application syncs its
    WAL (see capture.write_ltx), so after a power loss the newest ones may be
    truncated. Whether their transactions survive is for the database files
    to say (recover() keeps them if SQLite has them). A full-length file that
    fails its checksum is corruption, not a crash: recovery refuses it.
    """
    dropped: list[tuple[int, int]] = []
    while files:
        lo, hi, path = files[-1]
        if saved is not None and saved.ltx_unchanged(path):
            break  # complete at the clean stop, untouched since
        if cleanstop.was_verified(db.dir, path):
            break  # verified and fsynced before, untouched since
        try:
            return files, dropped, verify_file(path)
        except LTXError as exc:
            if "truncated:" not in str(exc):
                break
            log.warning(
                "removing an LTX file cut short by a crash; the database files decide "
                "whether its transaction survived %s",
                kv(db=db.name, file=path.name),
            )
            path.unlink()
            dropped.insert(0, (lo, hi))
            files = files[:-1]
    return files, dropped, None


def _recover_wal(db: Database, header: Header | None) -> bool:
    """Checkpoint the WAL's committed frames into the database; set the rest aside.

    True if it held committed transactions the LTX history does not have.
    """
    wal_path = db.path(FileKind.WAL)
    beyond = False
    if not wal_path.exists():
        return beyond
    if wal_path.stat().st_size >= WAL_HEADER_SIZE:
        with open(wal_path, "rb") as f:
            try:
                wal_header = parse_wal_header(f.read(WAL_HEADER_SIZE))
            except SQLiteFormatError:
                wal_header = None
        captured_end = 0
        if (
            wal_header is not None
            and header is not None
            and header.wal_size > 0
            and (header.wal_salt1, header.wal_salt2) == (wal_header.salt1, wal_header.salt2)
        ):
            captured_end = header.wal_offset + header.wal_size
        if captured_end:
            # Every committed transaction in this WAL, captured or not: SQLite
            # would read them all, so they are committed (an LTX file lost or
            # cut short leaves the database ahead of its history: recover()
            # records it).
            beyond = _checkpoint_wal(db, wal_path, wal_path.stat().st_size) > captured_end
        elif wal_header is not None and wal_path.stat().st_size > WAL_HEADER_SIZE:
            aside = db.dir / f"wal.aside-{int(time.time())}"
            os.rename(wal_path, aside)
            log.warning(
                "WAL frames not captured by any LTX file set aside %s",
                kv(db=db.name, path=aside),
            )
    wal_path.unlink(missing_ok=True)
    return beyond


def _checkpoint_wal(db: Database, wal_path: Path, end: int) -> int:
    """Fold the WAL's committed transactions up to `end` in; return where the last ended."""
    folded = 0
    with open(wal_path, "rb") as wf:
        reader = WALReader(wf)
        page_size = reader.header.page_size
        latest: dict[int, int] = {}
        commit = None
        for txn in reader.transactions():
            if txn.end_offset > end:
                break
            latest.update(txn.pages)
            commit = txn.commit
            folded = txn.end_offset
        if commit is None:
            return 0
        fold_wal_pages(db.db_path, wf.fileno(), latest, page_size, commit)
    log.info("checkpointed WAL frames %s", kv(db=db.name, pages=len(latest)))
    return folded


def _adopt_existing_file(db: Database) -> None:
    """A database file with no LTX history (placed in data.dir by hand): snapshot it."""
    if not db.db_path.exists() or db.db_path.stat().st_size == 0:
        db.db_path.unlink(missing_ok=True)
        db.checksums = None
        return
    fd = db.db_reader()
    try:
        page_size, commit = db.read_db_header(fd)
    except SQLiteFormatError as exc:
        raise RecoveryError(
            f"database {db.name}: {db.db_path} is not a SQLite database ({exc})"
        ) from exc
    log.info("adopting existing database file as TXID 1 %s", kv(db=db.name))
    record_whole_file(db, fd, page_size, commit)


def record_whole_file(
    db: Database, fd: int, page_size: int, commit: int, *, notify: bool = True
) -> None:
    """Every page of the database file as the next LTX file (its whole state)."""
    capture.write_ltx(
        db,
        page_size,
        commit,
        all_pages(fd, page_size, commit),
        checksums_of(fd, page_size, commit),
        full=True,
        notify=notify,
    )


def all_pages(fd: int, page_size: int, commit: int) -> Iterator[tuple[int, bytes]]:
    lock = lock_pgno(page_size)
    for pgno in range(1, commit + 1):
        if pgno != lock:
            yield pgno, os.pread(fd, page_size, (pgno - 1) * page_size).ljust(page_size, b"\0")


def _checksums_with_progress(db: Database, fd: int, page_size: int, commit: int) -> PageChecksums:
    """The startup check's full read, shown as progress (logs and status)."""
    board = db.progress
    if board is None:
        return checksums_of(fd, page_size, commit)
    with (
        board.track(STARTUP_CHECK, db.name, commit * page_size) as progress,
        os.fdopen(os.dup(fd), "rb") as f,
    ):
        return PageChecksums.from_file(f, page_size, commit, on_progress=progress.advance)


def checksums_of(fd: int, page_size: int, commit: int) -> PageChecksums:
    with os.fdopen(os.dup(fd), "rb") as f:
        return PageChecksums.from_file(f, page_size, commit)


def _reapply_newest(db: Database, newest: Path, page_size: int, expected: int) -> None:
    """Make the database equal to the newest LTX's post-apply state, or refuse."""
    fd = db.db_reader()
    with open(newest, "rb") as f, os.fdopen(os.dup(fd), "r+b") as out:
        dec = Decoder(f)
        commit = dec.header.commit
        # As it was written (the lock page untouched), then checked as a whole below.
        write_pages(out, dec.pages(), page_size, commit, zero_lock_page=False)
        os.fsync(out.fileno())
    checksums = checksums_of(fd, page_size, commit)
    if checksums.total != expected:
        raise RecoveryError(
            f"database {db.name}: checksum {checksums.total:016x} after re-applying "
            f"{newest.name} does not match its post-apply checksum {expected:016x}: "
            f"pages not covered by that file differ from the history. The database "
            f"stays offline; restore it from a replica (`litefspy export` there, then "
            f"`litefspy import`), or move {db.dir} aside"
        )
    db.checksums = checksums


def needs_settling(db: Database) -> bool:
    """Is there anything besides the database file that readers would see?

    A replica's WAL is empty and it has no journal, except after writes a
    halt lock allowed (write forwarding) or a demotion.
    """
    return bool(db.wal.index) or db.wal.header is not None or (db.path(FileKind.JOURNAL).exists())


def settle(db: Database, *, verify: bool = True) -> str | None:
    """Worker thread, every SQLite connection locked out: leave only committed state.

    Rolls back a hot journal nobody finished, checkpoints the captured WAL
    frames into the database and empties the WAL (a replica applies LTX files
    to the database file, so old frames must never overlay them). With
    `verify`, the database file is then checked against the position
    (O(size): demotion only). Returns what was done, for the log, or None.
    """
    done = []
    journal = db.path(FileKind.JOURNAL)
    if journal.exists():
        if is_hot_journal(journal, db.db_path, db.super_journal_exists):
            pages = rollback_journal(journal, db.db_path)
            done.append(f"rolled back a hot journal ({pages} pages)")
        # Nobody holds a lock: what is left is SQLite's own garbage (a
        # transaction that died before its journal was synced), which a
        # reader would try to delete, and readers may not delete on a replica.
        journal.unlink()
    db.journal_active = False
    db.dirty.clear()
    wal = db.path(FileKind.WAL)
    if db.wal.index and db.checksums is not None:
        wal_fd = os.open(wal, os.O_RDONLY)
        try:
            fold_wal_pages(
                db.db_path,
                wal_fd,
                db.wal.index,
                db.checksums.page_size,
                db.checksums.page_count,
            )
        finally:
            os.close(wal_fd)
        done.append(f"checkpointed {len(db.wal.index)} WAL pages")
    if wal.exists() and wal.stat().st_size > 0:
        os.truncate(wal, 0)
    db.wal.reset()
    # The capture descriptors stay open: the files are the same ones (the WAL
    # only emptied), and they are closed on the trio thread that uses them.
    if verify and db.checksums is not None and db.exists():
        with open(db.db_path, "rb") as f:
            actual = PageChecksums.from_file(f, db.checksums.page_size, db.checksums.page_count)
        if actual.total != db.pos.checksum:
            raise RecoveryError(
                f"database {db.name} does not match its position {db.pos} after "
                "demotion; it will be re-snapshotted from the new primary"
            )
    return "; ".join(done) or None


def _txid_ranges(ranges: list[tuple[int, int]]) -> str:
    return ",".join(f"{lo:x}" if lo == hi else f"{lo:x}-{hi:x}" for lo, hi in ranges)


def _quick_check(path: Path) -> str | None:
    """SQLite's quick_check of a database file no one else has open; None when it passes."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        conn.close()
    result = "; ".join(str(r[0]) for r in rows[:3])
    return None if result == "ok" else result


def fold_wal_pages(
    db_path: Path, wal_fd: int, pages: dict[int, int], page_size: int, commit: int
) -> None:
    """Checkpoint by hand: copy committed WAL pages (pgno -> page data offset) into
    the database file, cut it to `commit` pages and fsync it."""
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for pgno in sorted(pages):
            if pgno <= commit:
                os.pwrite(fd, os.pread(wal_fd, page_size, pages[pgno]), (pgno - 1) * page_size)
        os.ftruncate(fd, commit * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)
