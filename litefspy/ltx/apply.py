"""Applying LTX files to database files, and snapshotting a database into one.

`write_pages` is the one place pages land in a database file (replica apply,
forwarded commits, recovery, import, `litefspy ltx apply`, restore).

Every apply is two passes over the LTX file: a dry run that decodes it fully
(file checksum, page rules) and computes the resulting database checksum on a
copy of the rolling checksums, then the pass that writes pages.  A corrupt,
truncated or mismatched file is therefore rejected before the database is
touched, without buffering a whole (possibly huge) snapshot in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from litefspy.errors import LTXChecksumError, LTXError, SQLiteFormatError
from litefspy.fsutil import StrPath, atomic_write, fsync_dir
from litefspy.ltx.checksum import READ_CHUNK, PageChecksums, page_checksum, read_exactly_into
from litefspy.ltx.decoder import Decoder
from litefspy.ltx.encoder import encode_snapshot
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS,
    Header,
    Trailer,
    lock_pgno,
)
from litefspy.sqlite.header import parse_database_header

_MAX_COMMIT = (1 << 32) - 1
# Contiguous pages are written to the database in runs of at most this size
# and _RUN_PAGES pages: into a real file as one pwritev (no copy into one
# buffer; well under IOV_MAX; longer runs were no faster).
_WRITE_RUN = 4 << 20
_RUN_PAGES = 256


def _plan(ltx: BinaryIO, current: PageChecksums | None) -> tuple[Header, Trailer, PageChecksums]:
    """Dry run: fully decode one LTX file and compute the checksums after applying it.

    `current` describes the database before (None: not needed, the file must
    be a snapshot).  Raises before anything is written anywhere.
    """
    dec = Decoder(ltx)
    header = dec.header
    if header.is_snapshot:
        after = PageChecksums(header.page_size)
    else:
        if current is None:
            raise LTXError("an incremental LTX file needs the database it continues")
        if current.page_count and current.page_size != header.page_size:
            raise LTXError(
                f"page size {header.page_size} does not match the database's {current.page_size}"
            )
        if header.pre_apply_checksum != current.total:
            raise LTXChecksumError(
                f"pre-apply checksum {header.pre_apply_checksum:016x} does not match the "
                f"database's checksum {current.total:016x}"
            )
        after = current.copy()
        if after.page_size != header.page_size:
            # An empty database has no page size of its own yet.
            after.clear(header.page_size)
    for pgno, data in dec.pages():
        after.set(pgno, page_checksum(pgno, data))
    after.truncate(header.commit)
    trailer = dec.trailer
    if trailer.post_apply_checksum != after.total:
        raise LTXChecksumError(
            f"post-apply checksum {trailer.post_apply_checksum:016x} does not match the "
            f"database after applying ({after.total:016x})"
        )
    return header, trailer, after


def write_pages(
    db: BinaryIO,
    pages: Iterable[tuple[int, bytes]],
    page_size: int,
    commit: int,
    *,
    zero_lock_page: bool,
) -> None:
    """The one page writer: put a transaction's pages into a database file.

    Writes `pages` (contiguous ones in runs), zeros the lock page if asked (a
    materialized snapshot has zeros there, whatever an older file held), cuts
    the file to `commit` pages and flushes. Does not fsync: the caller decides
    what is durable before what. Every check (dry run, checksums) happens
    before this is called.
    """
    fd = _fileno(db)
    if fd is not None:
        db.flush()  # runs go to the file descriptor itself, past the buffer
    most = min(_WRITE_RUN // page_size, _RUN_PAGES)
    run: list[bytes] = []
    run_start = 0  # first pgno of `run`
    for pgno, data in pages:
        if run and (pgno != run_start + len(run) or len(run) >= most):
            _write_run(db, fd, run, (run_start - 1) * page_size)
            run = []
        if not run:
            run_start = pgno
        run.append(data)
    if run:
        _write_run(db, fd, run, (run_start - 1) * page_size)
    _finish_pages(db, page_size, commit, zero_lock_page=zero_lock_page)


def _finish_pages(db: BinaryIO, page_size: int, commit: int, *, zero_lock_page: bool) -> None:
    lock = lock_pgno(page_size)
    if zero_lock_page and commit >= lock:
        db.seek((lock - 1) * page_size)
        db.write(bytes(page_size))
    db.truncate(commit * page_size)
    db.flush()


def write_page_batches(
    db: BinaryIO,
    batches: Iterable[tuple[list[int], list[Any]]],
    page_size: int,
    commit: int,
    *,
    zero_lock_page: bool,
) -> None:
    """`write_pages` for pages in batches (`Decoder.page_batches`): the same writes.

    Each batch is cut into runs of consecutive pages without a step per page
    where the whole batch is one run (a snapshot's pages are).
    """
    fd = _fileno(db)
    if fd is not None:
        db.flush()
    most = min(_WRITE_RUN // page_size, _RUN_PAGES)
    for pgnos, pages in batches:
        for i, j in consecutive_runs(pgnos, most):
            _write_run(db, fd, pages[i:j], (pgnos[i] - 1) * page_size)
    _finish_pages(db, page_size, commit, zero_lock_page=zero_lock_page)


def consecutive_runs(pgnos: Sequence[int], most: int) -> Iterator[tuple[int, int]]:
    """Index ranges [i, j) of `pgnos` (ascending) that are consecutive page numbers,
    at most `most` long."""
    n = len(pgnos)
    if n and pgnos[-1] - pgnos[0] == n - 1:  # all consecutive (they ascend)
        for i in range(0, n, most):
            yield i, min(i + most, n)
        return
    i = 0
    while i < n:
        j = i + 1
        start = pgnos[i]
        while j < n and j - i < most and pgnos[j] == start + (j - i):
            j += 1
        yield i, j
        i = j


def _fileno(f: BinaryIO) -> int | None:
    """The file descriptor behind `f`, or None (an in-memory file)."""
    try:
        return f.fileno()
    except (AttributeError, OSError):
        return None


def _write_run(db: BinaryIO, fd: int | None, run: list[bytes], offset: int) -> None:
    """Write consecutive pages at `offset`: one pwritev where there is a descriptor."""
    if fd is None:
        db.seek(offset)
        db.write(b"".join(run))
        return
    written = os.pwritev(fd, run, offset)
    total = sum(map(len, run))
    if written < total:  # a short write (a full disk says so on the next call)
        rest = memoryview(b"".join(run))[written:]
        offset += written
        while rest:
            n = os.pwrite(fd, rest, offset)
            rest, offset = rest[n:], offset + n


def _write_pages(db: BinaryIO, ltx: BinaryIO) -> Header:
    """Second pass: write the pages of an already checked LTX file into db."""
    dec = Decoder(ltx)
    header = dec.header
    write_pages(db, dec.pages(), header.page_size, header.commit, zero_lock_page=header.is_snapshot)
    return header


def apply_ltx(
    db: BinaryIO, ltx: BinaryIO, checksums: PageChecksums | None
) -> tuple[Header, Trailer]:
    """Apply one LTX file to an open database file (both seekable).

    Requires the pre-apply checksum to equal the database's current checksum
    (unless the file is a snapshot), writes the pages, truncates the database
    to commit pages and requires the post-apply checksum.  `checksums` is
    the database's rolling state and is updated; None means compute it from
    db.  The whole LTX file is checked before the first write (see the module
    doc), so on any error db and checksums are unchanged.  Does not fsync.
    """
    start = ltx.tell()
    header = Decoder(ltx).header
    ltx.seek(start)
    current = checksums
    if current is None and not header.is_snapshot:
        size = db.seek(0, os.SEEK_END)
        if size % header.page_size:
            raise LTXError(
                f"database size {size} is not a multiple of the LTX page size {header.page_size}"
            )
        current = PageChecksums.from_file(db, header.page_size)
    header, trailer, after = _plan(ltx, current)
    ltx.seek(start)
    _write_pages(db, ltx)
    if checksums is not None:
        checksums.replace_with(after)
    return header, trailer


def _read_header(path: StrPath) -> Header:
    with open(path, "rb") as f:
        return Decoder(f).header


def _prefixed(exc: LTXError, path: StrPath) -> LTXError:
    return type(exc)(f"{os.fspath(path)}: {exc}")


def apply_files(db_path: StrPath, ltx_paths: Sequence[StrPath]) -> tuple[int, int]:
    """Apply LTX files in order to the database at db_path; returns (TXID, checksum) after.

    The files must be contiguous (each min TXID == previous max TXID + 1).
    The first may be a snapshot (db_path need not exist then) or must
    continue the database: its pre-apply checksum equals the database's.
    Every file is checked (dry run) before the database is touched.  A file
    with commit 0 leaves no database: the file at db_path is deleted.
    """
    if not ltx_paths:
        raise LTXError("no LTX files to apply")
    db_path = Path(db_path)
    headers: list[Header] = []
    for path in ltx_paths:
        try:
            headers.append(_read_header(path))
        except LTXError as exc:
            raise _prefixed(exc, path) from exc
    for i in range(1, len(headers)):
        prev, cur = headers[i - 1], headers[i]
        if cur.min_txid != prev.max_txid + 1:
            raise LTXError(
                f"{os.fspath(ltx_paths[i])}: TXID gap: starts at {cur.min_txid:016x} but "
                f"{os.fspath(ltx_paths[i - 1])} ends at {prev.max_txid:016x}"
            )

    first = headers[0]
    exists = db_path.exists()
    current: PageChecksums | None = None
    if not first.is_snapshot:
        if exists:
            with open(db_path, "rb") as db:
                size = os.fstat(db.fileno()).st_size
                if size % first.page_size:
                    raise LTXError(
                        f"{db_path}: size {size} is not a multiple of the LTX page size "
                        f"{first.page_size}"
                    )
                current = PageChecksums.from_file(db, first.page_size)
        else:
            current = PageChecksums(first.page_size)  # a missing database is empty

    plan = current
    for path in ltx_paths:
        try:
            with open(path, "rb") as f:
                _, _, plan = _plan(f, plan)
        except LTXError as exc:
            raise _prefixed(exc, path) from exc
    assert plan is not None

    last = headers[-1]
    if last.commit == 0:
        # The last transaction deleted the database: the file goes away.
        if exists:
            db_path.unlink()
            fsync_dir(db_path.parent)
        return last.max_txid, CHECKSUM_FLAG
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as db:
        for path in ltx_paths:
            with open(path, "rb") as f:
                _write_pages(db, f)
        os.fsync(db.fileno())
    if not exists:
        fsync_dir(db_path.parent)
    return last.max_txid, plan.total


def read_sqlite_page_size(header: bytes, name: str = "database") -> int:
    """Page size from the first 100 bytes of a SQLite database (SQLiteFormatError if not one)."""
    if len(header) < 100:
        raise SQLiteFormatError(f"{name}: not a SQLite database (only {len(header)} bytes)")
    try:
        return parse_database_header(header).page_size
    except SQLiteFormatError as exc:
        raise SQLiteFormatError(f"{name}: {exc}") from None


def encode_database(
    db_path: StrPath,
    out_path: StrPath,
    *,
    txid: int = 1,
    compress: bool = True,
    node_id: int = 0,
    timestamp_ms: int | None = None,
) -> tuple[Header, Trailer]:
    """Write the database file at db_path as an LTX snapshot (TXIDs 1..txid) to out_path.

    Reads only the main database file: the caller keeps writers out and
    checkpoints any WAL first.  The lock page is skipped.  out_path is
    written durably (temp name, fsync, rename, fsync dir).
    """
    name = os.fspath(db_path)
    with open(db_path, "rb") as db:
        size = os.fstat(db.fileno()).st_size
        page_size = read_sqlite_page_size(db.read(100), name)
        if size % page_size:
            raise SQLiteFormatError(
                f"{name}: size {size} is not a whole number of {page_size}-byte pages"
            )
        page_count = size // page_size
        if page_count > _MAX_COMMIT:
            raise SQLiteFormatError(f"{name}: {page_count} pages is more than LTX can hold")
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        header = Header(
            flags=FLAG_COMPRESS if compress else 0,
            page_size=page_size,
            commit=page_count,
            min_txid=1,
            max_txid=txid,
            timestamp=timestamp_ms,
            pre_apply_checksum=0,
            wal_offset=0,
            wal_size=0,
            wal_salt1=0,
            wal_salt2=0,
            node_id=node_id,
        )
        with atomic_write(out_path) as out:
            trailer = encode_snapshot(out, header, _file_pages(db, page_size, page_count, name))
    return header, trailer


def _file_pages(
    db: BinaryIO, page_size: int, page_count: int, name: str
) -> Iterator[tuple[int, memoryview]]:
    """Every page of db, read in large chunks (each view is valid until the next)."""
    per_chunk = max(1, READ_CHUNK // page_size)
    buf = bytearray(per_chunk * page_size)
    view = memoryview(buf)
    pgno = 1
    db.seek(0)
    while pgno <= page_count:
        n = min(per_chunk, page_count - pgno + 1)
        want = n * page_size
        if read_exactly_into(db, view[:want]) != want:
            raise SQLiteFormatError(f"{name}: database shrank while it was being encoded")
        off = 0
        for p in range(pgno, pgno + n):
            yield p, view[off : off + page_size]
            off += page_size
        pgno += n
