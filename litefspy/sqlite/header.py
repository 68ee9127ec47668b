"""The 100-byte header at the start of every SQLite database file (FORMATS.md section 2).

Only the fields litefspy needs are decoded: the page size (to split writes into
pages), the file-format versions (WAL or rollback journal), and the change
counter / page count pair that says whether the in-header size can be trusted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from litefspy.errors import SQLiteFormatError

__all__ = [
    "HEADER_SIZE",
    "MAX_PAGE_SIZE",
    "MIN_PAGE_SIZE",
    "PENDING_BYTE",
    "RESERVED_BYTE",
    "SHARED_FIRST",
    "SHARED_SIZE",
    "SQLITE_MAGIC",
    "DatabaseHeader",
    "is_valid_page_size",
    "lock_page",
    "parse_database_header",
]

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
# The byte range SQLite locks; the page holding it is never used for data.
PENDING_BYTE = 0x40000000
# Database file lock bytes (unix VFS): PENDING, RESERVED, then the SHARED range.
RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510

# page size u16 @16, write version u8 @18, read version u8 @19,
# change counter u32 @24, page count u32 @28, ..., version-valid-for u32 @92,
# SQLite version number u32 @96.
_PAGE_SIZE = struct.Struct(">H")
_U32 = struct.Struct(">I")


def is_valid_page_size(page_size: int) -> bool:
    """True for the page sizes SQLite supports: powers of two from 512 to 65536."""
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0


def lock_page(page_size: int) -> int:
    """The page number that contains PENDING_BYTE (never written by SQLite)."""
    return PENDING_BYTE // page_size + 1


@dataclass(frozen=True)
class DatabaseHeader:
    """The fields of a database header that litefspy uses."""

    page_size: int
    write_version: int
    read_version: int
    change_counter: int
    page_count: int
    version_valid_for: int
    sqlite_version: int

    @property
    def is_wal(self) -> bool:
        """The database is in WAL mode (file format version 2)."""
        return self.write_version == 2 or self.read_version == 2

    @property
    def page_count_valid(self) -> bool:
        """The in-header page count is trustworthy.

        Older SQLite versions did not maintain it; SQLite trusts it only when
        the version-valid-for number equals the change counter.
        """
        return self.version_valid_for == self.change_counter and self.page_count > 0


def parse_database_header(data: bytes | bytearray | memoryview) -> DatabaseHeader:
    """Decode the first 100 bytes of a database file.

    Raises SQLiteFormatError when the data is too short, lacks the SQLite
    magic, or has a page size SQLite could not have written.
    """
    if len(data) < HEADER_SIZE:
        raise SQLiteFormatError(
            f"SQLite database header is too short: {len(data)} bytes, need {HEADER_SIZE}"
        )
    raw = bytes(data[:HEADER_SIZE])
    if raw[:16] != SQLITE_MAGIC:
        raise SQLiteFormatError("not a SQLite database: the file does not start with the magic")
    (encoded_page_size,) = _PAGE_SIZE.unpack_from(raw, 16)
    # 65536 does not fit in the two-byte field, so SQLite stores it as 1.
    page_size = 65536 if encoded_page_size == 1 else encoded_page_size
    if not is_valid_page_size(page_size):
        raise SQLiteFormatError(
            f"SQLite database header has an invalid page size {encoded_page_size}: "
            "expected a power of two from 512 to 65536"
        )
    return DatabaseHeader(
        page_size=page_size,
        write_version=raw[18],
        read_version=raw[19],
        change_counter=_U32.unpack_from(raw, 24)[0],
        page_count=_U32.unpack_from(raw, 28)[0],
        version_valid_for=_U32.unpack_from(raw, 92)[0],
        sqlite_version=_U32.unpack_from(raw, 96)[0],
    )
