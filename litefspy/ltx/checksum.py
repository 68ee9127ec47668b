"""CRC-64 page and database checksums (FORMATS.md section 1, "Checksums").

The database checksum is `F | XOR of page checksums`, so it can be kept up to
date per written page instead of rereading the database on every commit;
PageChecksums is that rolling state.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np
from fastcrc import crc64 as _fastcrc64

from litefspy.errors import LTXError, SQLiteFormatError
from litefspy.ltx.format import CHECKSUM_FLAG, lock_pgno
from litefspy.sqlite.header import is_valid_page_size

__all__ = [
    "CHECKSUM_FLAG",
    "READ_CHUNK",
    "PageChecksums",
    "checksum_database_file",
    "crc64",
    "page_checksum",
    "read_exactly_into",
]

# Reads of this size keep syscall and per-read Python overhead far below the CRC
# cost while the reused buffer stays small.
READ_CHUNK = 4 << 20

_crc: Callable[..., int] = _fastcrc64.go_iso
# The same function without `crc64`'s extra call, for loops that run it per page.
crc64_unwrapped = _crc


def crc64(data: bytes | bytearray | memoryview, initial: int | None = None) -> int:
    """CRC-64/GO-ISO of data; `initial` is a previous result, to continue it over more data."""
    return _crc(data, initial)


def page_checksum(pgno: int, data: bytes | bytearray | memoryview) -> int:
    """`F | crc(be32(pgno) + page)`, computed without concatenating."""
    return CHECKSUM_FLAG | _crc(data, _crc(pgno.to_bytes(4, "big")))


def _file_size(f: BinaryIO) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        # In-memory streams (BytesIO) have no descriptor.
        pos = f.tell()
        size = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return size


def read_exactly_into(f: BinaryIO, view: memoryview) -> int:
    """Fill view from f (short reads retried); returns the bytes read (< len at EOF)."""
    readinto = getattr(f, "readinto", None)
    total = 0
    size = len(view)
    while total < size:
        if readinto is not None:
            n = readinto(view[total:])
        else:
            chunk = f.read(size - total)
            n = len(chunk)
            view[total : total + n] = chunk
        if not n:
            break
        total += n
    return total


def _scan_pages(
    f: BinaryIO,
    page_size: int,
    page_count: int,
    out: array[int] | None,
    name: str,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """XOR of the page checksums of pages 1..page_count read from offset 0 of f.

    Stores each checksum in `out[pgno - 1]` when given; calls `on_progress(bytes)`
    after each chunk read (a few MiB: negligible next to the CRC work).  The hot loop binds
    everything to locals and slices one reused buffer: this is the throughput
    path for startup recovery and strict verification.
    """
    if not is_valid_page_size(page_size):
        raise LTXError(f"invalid page size {page_size}")
    lock = lock_pgno(page_size)
    per_chunk = max(1, READ_CHUNK // page_size)
    buf = bytearray(per_chunk * page_size)
    view = memoryview(buf)
    crc = _crc
    flag = CHECKSUM_FLAG
    xor = 0
    pgno = 1
    f.seek(0)
    while pgno <= page_count:
        n = min(per_chunk, page_count - pgno + 1)
        want = n * page_size
        got = read_exactly_into(f, view[:want])
        if got != want:
            have = pgno - 1 + got // page_size
            raise SQLiteFormatError(
                f"{name}: database file ends after {have} whole pages, expected {page_count}"
            )
        off = 0
        for p in range(pgno, pgno + n):
            if p != lock:
                ck = flag | crc(view[off : off + page_size], crc(p.to_bytes(4, "big")))
                xor ^= ck
                if out is not None:
                    out[p - 1] = ck
            off += page_size
        pgno += n
        if on_progress is not None:
            on_progress(want)
    return xor


class PageChecksums:
    """Rolling database checksum: per-page checksums in memory (array('Q'), index pgno-1),
    XOR total kept incrementally.

    Pages never set count as 0 (absent); the lock page is always 0.  Growing
    the database past its end (set() beyond page_count, truncate() upwards)
    fills the new pages with the checksums of zero-filled pages, as a write or
    ftruncate past the end of the file does to the file itself, so the state
    always equals what checksum_database_file() would compute from disk.
    """

    def __init__(self, page_size: int) -> None:
        if not is_valid_page_size(page_size):
            raise LTXError(f"invalid page size {page_size}")
        self.page_size = page_size
        self._lock = lock_pgno(page_size)
        self._cks: array[int] = array("Q")
        self._xor = 0
        self._zero: bytes | None = None

    @classmethod
    def from_file(
        cls,
        f: BinaryIO,
        page_size: int,
        page_count: int | None = None,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> PageChecksums:
        """Checksum pages 1..page_count of a database file (default: its whole pages).

        `on_progress(bytes)` is called as the file is read (progress reports).
        """
        if page_count is None:
            page_count = _file_size(f) // page_size
        sums = cls(page_size)
        sums._cks = array("Q", bytes(8 * page_count))
        sums._xor = _scan_pages(
            f, page_size, page_count, sums._cks, _name_of(f), on_progress=on_progress
        )
        return sums

    def to_bytes(self) -> bytes:
        """The per-page checksums as little-endian u64s (see `from_bytes`)."""
        cks = array("Q", self._cks)
        if sys.byteorder != "little":
            cks.byteswap()
        return cks.tobytes()

    @classmethod
    def from_bytes(cls, page_size: int, data: bytes) -> PageChecksums:
        """The state `to_bytes` saved; raises LTXError if `data` is not whole u64s."""
        if len(data) % 8:
            raise LTXError(f"page checksums: {len(data)} bytes is not a whole number of u64s")
        sums = cls(page_size)
        cks = array("Q")
        cks.frombytes(data)
        if sys.byteorder != "little":
            cks.byteswap()
        sums._cks = cks
        # numpy: a 10 GiB database has 2.6 million pages to fold.
        sums._xor = int(np.bitwise_xor.reduce(np.frombuffer(data, dtype="<u8"))) if data else 0
        return sums

    @property
    def page_count(self) -> int:
        """The database's size in pages."""
        return len(self._cks)

    @property
    def total(self) -> int:
        """The database checksum: `F | XOR of all page checksums` (`F` when empty)."""
        return CHECKSUM_FLAG | self._xor

    def get(self, pgno: int) -> int:
        """Checksum of one page; 0 for the lock page and beyond the end."""
        if 1 <= pgno <= len(self._cks):
            return self._cks[pgno - 1]
        return 0

    def set(self, pgno: int, checksum: int) -> None:
        """Record a page's checksum, growing the database if pgno is past its end."""
        if pgno < 1:
            raise LTXError(f"invalid page number {pgno}")
        if pgno == self._lock:
            raise LTXError(f"page {pgno} is SQLite's lock page and is never stored")
        if pgno > len(self._cks):
            self._grow(pgno - 1)
            self._cks.append(0)
        old = self._cks[pgno - 1]
        self._cks[pgno - 1] = checksum
        self._xor ^= old ^ checksum

    def set_run(self, start: int, checksums: Sequence[int]) -> None:
        """`set` for pages start, start + 1, ... at once (a run of consecutive pages)."""
        n = len(checksums)
        if n == 0:
            return
        if start < 1:
            raise LTXError(f"invalid page number {start}")
        if start <= self._lock < start + n:
            raise LTXError(f"page {self._lock} is SQLite's lock page and is never stored")
        new = checksums if isinstance(checksums, array) else array("Q", checksums)
        self._grow(start - 1)
        replaced = self._cks[start - 1 : start - 1 + n]
        self._cks[start - 1 : start - 1 + n] = new  # extends the array past its end
        self._xor ^= _xor_of(replaced) ^ _xor_of(new)

    def update_page(self, pgno: int, data: bytes | bytearray | memoryview) -> int:
        """Compute a page's checksum from its contents, record it and return it."""
        if len(data) != self.page_size:
            raise LTXError(f"page {pgno} is {len(data)} bytes, expected {self.page_size}")
        checksum = page_checksum(pgno, data)
        self.set(pgno, checksum)
        return checksum

    def truncate(self, page_count: int) -> None:
        """Resize to page_count pages, like ftruncate on the file (see the class doc)."""
        if page_count < 0:
            raise LTXError(f"invalid page count {page_count}")
        if page_count >= len(self._cks):
            self._grow(page_count)
            return
        xor = self._xor
        for ck in self._cks[page_count:]:
            xor ^= ck
        self._xor = xor
        del self._cks[page_count:]

    def clear(self, page_size: int | None = None) -> None:
        """Forget every page (an empty database), optionally switching page size."""
        if page_size is not None:
            if not is_valid_page_size(page_size):
                raise LTXError(f"invalid page size {page_size}")
            self.page_size = page_size
            self._lock = lock_pgno(page_size)
            self._zero = None
        self._cks = array("Q")
        self._xor = 0

    def copy(self) -> PageChecksums:
        """An independent copy (for dry runs that must not touch the original)."""
        other = PageChecksums(self.page_size)
        other._cks = array("Q", self._cks)
        other._xor = self._xor
        return other

    def replace_with(self, other: PageChecksums) -> None:
        """Take over another object's state (commit a dry run done on a copy)."""
        self.page_size = other.page_size
        self._lock = other._lock
        self._zero = None
        self._cks = array("Q", other._cks)
        self._xor = other._xor

    def _grow(self, page_count: int) -> None:
        """Append zero-filled pages up to page_count (no-op if already that large)."""
        start = len(self._cks) + 1
        if page_count < start:
            return
        if self._zero is None:
            self._zero = bytes(self.page_size)
        zero = self._zero
        xor = self._xor
        new = array("Q", bytes(8 * (page_count - start + 1)))
        for pgno in range(start, page_count + 1):
            if pgno != self._lock:
                ck = page_checksum(pgno, zero)
                new[pgno - start] = ck
                xor ^= ck
        self._cks.extend(new)
        self._xor = xor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageChecksums):
            return NotImplemented
        return self.page_size == other.page_size and self._cks == other._cks

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PageChecksums(page_size={self.page_size}, page_count={self.page_count}, "
            f"total={self.total:016x})"
        )


def _xor_of(values: array[int]) -> int:
    """XOR of unsigned 64-bit values (numpy: one pass in C)."""
    if not values:
        return 0
    return int(np.bitwise_xor.reduce(np.frombuffer(values, dtype=np.uint64)))


def _name_of(f: BinaryIO) -> str:
    name = getattr(f, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(name, bytes):
        return os.fsdecode(name)
    return "database"


def checksum_database_file(f: BinaryIO, page_size: int, page_count: int | None = None) -> int:
    """Database checksum of pages 1..page_count of f (default: its whole pages)."""
    if page_count is None:
        page_count = _file_size(f) // page_size
    return CHECKSUM_FLAG | _scan_pages(f, page_size, page_count, None, _name_of(f))
