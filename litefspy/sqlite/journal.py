"""SQLite's rollback journal (`NAME-journal`, FORMATS.md section 3) and hot-journal rollback.

Layout, as described by SQLite's file-format documentation: the journal is a
sequence of segments. Each segment starts with a header at a multiple of the
sector size (all integers big-endian):

    magic d9d505f920a163d7 (8) | record count (4) | checksum nonce (4) |
    original database size in pages (4) | sector size (4) | page size (4)

padded with zeros to the sector size, followed by `record count` records of
`pgno (4) | original page (page size) | checksum (4)`. The record checksum is
the nonce plus the bytes of the page at offsets page_size-200,
page_size-400, ... (> 0), as an unsigned 32-bit sum; it exists to catch records
whose write never completed. A record count of 0xffffffff means "every whole
record up to the end of the file" (written when SQLite does not sync the
journal, so it never goes back to fill in the count).

SQLite adds a new segment each time it syncs the journal in the middle of a
transaction (a cache spill), so pages journaled after the sync have their own
count that is only filled in by the next sync, before any of those pages is
overwritten in the database. Records beyond a segment's count are therefore
never needed: their pages were not yet written to the database.

Rolling back (what the next opener of a "hot" journal does): truncate the
database to the original size, write every record's original page back (the
first record of a page wins: it holds the page as it was before the
transaction), stop at the first record that is torn or fails its checksum,
then sync. The journal is deleted by the caller afterwards.

A transaction that spans several attached databases also has a super-journal
(`MAIN-mjXXXXXX9XX`, next to the main database) listing the journals of every
database it wrote, and each of those journals ends with a pointer to it:
`lock page number (4) | super-journal path | path length (4) | sum of the path's
bytes (4) | journal magic (8)`. Playback stops at the pointer (its page number is
the lock page's). SQLite deletes the super-journal to commit all databases at
once, so a journal whose super-journal no longer exists is not hot: its
transaction committed, and it must not be rolled back (`is_hot_journal`).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from litefspy.sqlite.header import is_valid_page_size, lock_page

__all__ = [
    "JOURNAL_HEADER_SIZE",
    "JOURNAL_MAGIC",
    "UNTIL_END_OF_FILE",
    "JournalHeader",
    "JournalRecord",
    "is_hot_journal",
    "iter_journal_records",
    "journal_record_checksum",
    "parse_journal_header",
    "read_super_journal_name",
    "rollback_journal",
    "super_journal_children",
    "super_journal_main",
]

JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")
JOURNAL_HEADER_SIZE = 28
# Record count meaning "as many whole records as the file holds".
UNTIL_END_OF_FILE = 0xFFFFFFFF

_HEADER_FIELDS = struct.Struct(">5I")
_U32 = struct.Struct(">I")
# The super-journal pointer's trailer: path length, path checksum, journal magic.
_SUPER_TRAILER_SIZE = 16
# SQLite's super-journal of a multi-database transaction: MAIN-mj + 6 hex digits,
# a 9, 2 hex digits (sqlite3VdbeHalt's "-mj%06X9%02X").
_SUPER_JOURNAL_RE = re.compile(r"^(.+)-mj[0-9A-F]{6}9[0-9A-F]{2}$")


def super_journal_main(name: str) -> str | None:
    """The MAIN of a super-journal's file name (MAIN-mjXXXXXXXXX), or None if it is not one."""
    match = _SUPER_JOURNAL_RE.match(name)
    return match.group(1) if match is not None else None


# SQLite's unix VFS allows paths up to this long (mxPathname).
_MAX_PATHNAME = 512
_MASK32 = 0xFFFFFFFF
# SQLite's limits for the sector size field; other values mean a torn header.
_MIN_SECTOR_SIZE = 32
_MAX_SECTOR_SIZE = 0x10000


@dataclass(frozen=True)
class JournalHeader:
    """One journal segment header."""

    record_count: int
    nonce: int
    initial_page_count: int
    sector_size: int
    page_size: int

    @property
    def until_end_of_file(self) -> bool:
        """The record count was never filled in: records run to the end of the file."""
        return self.record_count == UNTIL_END_OF_FILE


@dataclass(frozen=True)
class JournalRecord:
    """One valid journal record: the original content of page `pgno`."""

    segment_offset: int  # file offset of the header of the segment it belongs to
    offset: int  # file offset of the record (its pgno field)
    pgno: int
    data: bytes


def parse_journal_header(data: bytes | bytearray | memoryview) -> JournalHeader | None:
    """Decode a segment header; None when the magic is absent (zeroed or invalid journal)."""
    if len(data) < JOURNAL_HEADER_SIZE or bytes(data[:8]) != JOURNAL_MAGIC:
        return None
    return JournalHeader(*_HEADER_FIELDS.unpack_from(data, 8))


def journal_record_checksum(nonce: int, page: bytes | bytearray | memoryview) -> int:
    """The checksum SQLite stores after a journal record's page.

    It samples one byte every 200 bytes, walking down from the end of the page,
    so it catches torn writes cheaply rather than detecting corruption.
    """
    total = nonce + sum(page[len(page) - 200 : 0 : -200])
    return total & _MASK32


def _first_header_ok(header: JournalHeader) -> bool:
    # SQLite trusts a header only with plausible sizes: anything else means the
    # writer died before the header reached the disk.
    sector = header.sector_size
    return (
        is_valid_page_size(header.page_size)
        and _MIN_SECTOR_SIZE <= sector <= _MAX_SECTOR_SIZE
        and sector & (sector - 1) == 0
    )


def iter_journal_records(f: BinaryIO) -> Iterator[JournalRecord]:
    """Yield the records a hot-journal rollback would play back, in file order.

    Walks every segment (headers at sector-size multiples) and stops at the
    first missing or invalid header, short record, checksum mismatch, or
    record for page 0 or the lock page. Page and sector size come from the
    first header. Duplicate pages and pages past the original size are still
    yielded; `rollback_journal` applies SQLite's rules to them.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    first = parse_journal_header(f.read(JOURNAL_HEADER_SIZE))
    if first is None or not _first_header_ok(first):
        return
    page_size = first.page_size
    sector_size = first.sector_size
    record_size = 4 + page_size + 4
    forbidden_pgno = lock_page(page_size)
    header: JournalHeader | None = first
    header_offset = 0
    while header is not None and header_offset + sector_size <= size:
        record_offset = header_offset + sector_size
        count = header.record_count
        if header.until_end_of_file:
            count = (size - record_offset) // record_size
        for _ in range(count):
            f.seek(record_offset)
            raw = f.read(record_size)
            if len(raw) < record_size:
                return  # torn: the journal ends inside this record
            (pgno,) = _U32.unpack_from(raw, 0)
            page = raw[4 : 4 + page_size]
            (stored,) = _U32.unpack_from(raw, 4 + page_size)
            if pgno in (0, forbidden_pgno):
                return
            if journal_record_checksum(header.nonce, page) != stored:
                return
            yield JournalRecord(header_offset, record_offset, pgno, page)
            record_offset += record_size
        if header.until_end_of_file:
            return
        # The next segment header sits at the next sector boundary.
        header_offset = -(-record_offset // sector_size) * sector_size
        f.seek(header_offset)
        header = parse_journal_header(f.read(JOURNAL_HEADER_SIZE))


def read_super_journal_name(f: BinaryIO) -> str | None:
    """The super-journal path a journal points to, or None (SQLite's readSuperJournal).

    The pointer is the last thing in the journal. A pointer whose checksum does
    not add up was torn: SQLite then treats the journal as an ordinary hot one.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size < _SUPER_TRAILER_SIZE:
        return None
    f.seek(size - _SUPER_TRAILER_SIZE)
    trailer = f.read(_SUPER_TRAILER_SIZE)
    (length,) = _U32.unpack_from(trailer, 0)
    (checksum,) = _U32.unpack_from(trailer, 4)
    if trailer[8:] != JOURNAL_MAGIC or not 0 < length <= min(_MAX_PATHNAME, size - 16):
        return None
    f.seek(size - _SUPER_TRAILER_SIZE - length)
    raw = f.read(length)
    # SQLite sums the path as (signed) chars into an unsigned 32-bit value.
    total = sum(b - 256 if b > 127 else b for b in raw) & _MASK32
    if total != checksum or b"\0" in raw:
        return None
    return os.fsdecode(raw)


def super_journal_children(data: bytes) -> list[str]:
    """The journal paths a super-journal lists (NUL-terminated, one after another)."""
    return [os.fsdecode(name) for name in data.split(b"\0") if name]


def is_hot_journal(
    journal_path: str | os.PathLike[str],
    db_path: str | os.PathLike[str],
    super_journal_exists: Callable[[str], bool] | None = None,
) -> bool:
    """True when the journal must be rolled back into the database before use.

    That is: the database exists and the journal is non-empty and starts with
    the magic, and, if it points to a super-journal, that super-journal still
    exists (`super_journal_exists` resolves the path SQLite recorded; without
    it every pointer counts as present, i.e. the journal is rolled back). A
    PERSIST-mode journal invalidated by zeroing its header, an empty
    (TRUNCATE) journal or a missing one is not hot. Unlike SQLite this does not
    check locks: it is for litefspy's own recovery, with no SQLite process
    using the files.
    """
    if not Path(db_path).exists():
        # SQLite would create an empty database and discard the journal.
        return False
    try:
        with open(journal_path, "rb") as f:
            if parse_journal_header(f.read(JOURNAL_HEADER_SIZE)) is None:
                return False
            super_journal = read_super_journal_name(f)
    except FileNotFoundError:
        return False
    if super_journal is None or super_journal_exists is None:
        return True
    return super_journal_exists(super_journal)


def rollback_journal(journal_path: str | os.PathLike[str], db_path: str | os.PathLike[str]) -> int:
    """Play a hot journal back into the database as SQLite would; return pages restored.

    The database is truncated (or zero-extended) to the original size from the
    first header, every valid record's page is written back (first occurrence
    of a page wins; pages beyond the original size are skipped), and the
    database is fsynced. A journal without a valid first header changes
    nothing. The caller deletes the journal afterwards, which is what makes
    the rollback final.
    """
    with open(journal_path, "rb") as jf:
        first = parse_journal_header(jf.read(JOURNAL_HEADER_SIZE))
        if first is None or not _first_header_ok(first):
            return 0
        jf.seek(0, os.SEEK_END)
        if jf.tell() < first.sector_size:
            # Header not fully written: SQLite had not written a database page yet.
            return 0
        page_size = first.page_size
        original_pages = first.initial_page_count
        restored: set[int] = set()
        fd = os.open(db_path, os.O_RDWR)
        try:
            os.ftruncate(fd, original_pages * page_size)
            for record in iter_journal_records(jf):
                if record.pgno > original_pages or record.pgno in restored:
                    continue
                os.pwrite(fd, record.data, (record.pgno - 1) * page_size)
                restored.add(record.pgno)
            os.fsync(fd)
        finally:
            os.close(fd)
    return len(restored)
