"""SQLite's write-ahead log: header, frames, checksum chain (FORMATS.md section 4).

A WAL is a 32-byte header followed by frames of a 24-byte header plus one
page. Every frame carries a checksum that continues a running checksum from
the WAL header through every earlier frame, and the header's two salts; a
frame is valid only when both match. A transaction is committed when its last
frame (the one with a non-zero commit field, the database size in pages) is
valid. Everything here is pure: no FUSE, trio or gRPC.

The checksum is on the commit path of every WAL write made through the mount,
so `wal_checksum` is evaluated in closed form with numpy instead of looping
over word pairs in Python (see `_coefficients`).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from litefspy.errors import SQLiteFormatError
from litefspy.sqlite.header import is_valid_page_size

__all__ = [
    "WAL_FORMAT_VERSION",
    "WAL_FRAME_HEADER_SIZE",
    "WAL_HEADER_SIZE",
    "WAL_MAGIC_BE",
    "WAL_MAGIC_LE",
    "Frame",
    "FrameHeader",
    "WALHeader",
    "WALReader",
    "WALTransaction",
    "encode_frame",
    "encode_wal_header",
    "frame_checksum",
    "parse_frame_header",
    "parse_wal_header",
    "wal_checksum",
]

WAL_HEADER_SIZE = 32
WAL_FRAME_HEADER_SIZE = 24
WAL_MAGIC_LE = 0x377F0682
WAL_MAGIC_BE = 0x377F0683
WAL_FORMAT_VERSION = 3007000

_MASK32 = 0xFFFFFFFF
_HEADER = struct.Struct(">8I")
_FRAME_HEADER = struct.Struct(">6I")
# Below this many word pairs the numpy call overhead exceeds a Python loop.
_NUMPY_MIN_PAIRS = 16


# --------------------------------------------------------------------------- checksum


def _checksum_python(
    data: bytes | bytearray | memoryview, s0: int, s1: int, big_endian: bool
) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK32
        s1 = (s1 + words[i + 1] + s0) & _MASK32
    return s0, s1


@functools.lru_cache(maxsize=16)
def _coefficients(pairs: int) -> tuple[npt.NDArray[np.uint64], tuple[int, int, int, int]]:
    """Closed-form coefficients of the checksum over `pairs` word pairs.

    One pair (x0, x1) maps the state S = (s0, s1) to
    s0' = s0 + s1 + x0 and s1' = s0' + s1 + x1 = s0 + 2*s1 + x0 + x1,
    i.e. S' = M S + B x with M = [[1, 1], [1, 2]] and B = [[1, 0], [1, 1]].
    Unrolled over n pairs: S_n = M^n S_0 + sum_k M^(n-1-k) B x_k, all mod 2^32.
    Returns the 2 x 2n matrix whose rows dotted with the words give the sum
    (row r, column 2k+c = entry (r, c) of M^(n-1-k) B), and M^n.
    """
    row0 = [0] * (2 * pairs)
    row1 = [0] * (2 * pairs)
    # p = M^j B and m = M^j, both 2x2 as (top-left, top-right, bottom-left, bottom-right).
    p00, p01, p10, p11 = 1, 0, 1, 1
    m00, m01, m10, m11 = 1, 0, 0, 1
    for j in range(pairs):
        k = 2 * (pairs - 1 - j)
        row0[k], row0[k + 1], row1[k], row1[k + 1] = p00, p01, p10, p11
        p00, p01, p10, p11 = (
            (p00 + p10) & _MASK32,
            (p01 + p11) & _MASK32,
            (p00 + 2 * p10) & _MASK32,
            (p01 + 2 * p11) & _MASK32,
        )
        m00, m01, m10, m11 = (
            (m00 + m10) & _MASK32,
            (m01 + m11) & _MASK32,
            (m00 + 2 * m10) & _MASK32,
            (m01 + 2 * m11) & _MASK32,
        )
    matrix = np.array([row0, row1], dtype=np.uint64)
    matrix.setflags(write=False)
    return matrix, (m00, m01, m10, m11)


def wal_checksum(
    data: bytes | bytearray | memoryview, s0: int, s1: int, big_endian: bool
) -> tuple[int, int]:
    """Continue SQLite's WAL checksum (s0, s1) over `data` (a multiple of 8 bytes).

    For each pair of 32-bit words (x0, x1), read little- or big-endian:
    s0 += x0 + s1; s1 += x1 + s0 (mod 2^32).
    """
    size = len(data)
    if size % 8:
        raise ValueError(f"WAL checksum input must be a multiple of 8 bytes, got {size}")
    pairs = size // 8
    if pairs < _NUMPY_MIN_PAIRS:
        return _checksum_python(data, s0, s1, big_endian)
    matrix, (m00, m01, m10, m11) = _coefficients(pairs)
    words = np.frombuffer(data, dtype=">u4" if big_endian else "<u4").astype(np.uint64)
    # uint64 products and sums wrap mod 2^64, which keeps them exact mod 2^32.
    t0, t1 = (int(v) for v in np.dot(matrix, words))
    return (m00 * s0 + m01 * s1 + t0) & _MASK32, (m10 * s0 + m11 * s1 + t1) & _MASK32


def frame_checksum(
    frame_header: bytes | bytearray | memoryview,
    page: bytes | bytearray | memoryview,
    s0: int,
    s1: int,
    big_endian: bool,
) -> tuple[int, int]:
    """The running checksum after a frame: over its header bytes 0-7 (pgno, commit),
    then its page, starting from the previous frame's (or the WAL header's) checksum."""
    x0, x1 = struct.unpack_from(">II" if big_endian else "<II", frame_header, 0)
    s0 = (s0 + x0 + s1) & _MASK32
    s1 = (s1 + x1 + s0) & _MASK32
    return wal_checksum(page, s0, s1, big_endian)


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class WALHeader:
    """The 32-byte WAL file header."""

    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int

    @property
    def big_endian_checksums(self) -> bool:
        """The checksum reads words big-endian (the magic's low bit)."""
        return bool(self.magic & 1)

    @property
    def frame_size(self) -> int:
        """Bytes per frame: frame header plus one page."""
        return WAL_FRAME_HEADER_SIZE + self.page_size


def parse_wal_header(data: bytes | bytearray | memoryview) -> WALHeader:
    """Decode and validate a WAL header: magic, version 3007000, page size, checksum.

    Raises SQLiteFormatError naming what is wrong.
    """
    if len(data) < WAL_HEADER_SIZE:
        raise SQLiteFormatError(
            f"WAL header is too short: {len(data)} bytes, need {WAL_HEADER_SIZE}"
        )
    header = WALHeader(*_HEADER.unpack_from(data, 0))
    if header.magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise SQLiteFormatError(f"not a SQLite WAL: bad magic {header.magic:#010x}")
    if header.version != WAL_FORMAT_VERSION:
        raise SQLiteFormatError(
            f"unsupported WAL format version {header.version} (expected {WAL_FORMAT_VERSION})"
        )
    if not is_valid_page_size(header.page_size):
        raise SQLiteFormatError(f"WAL header has an invalid page size {header.page_size}")
    expected = wal_checksum(bytes(data[:24]), 0, 0, header.big_endian_checksums)
    if expected != (header.checksum1, header.checksum2):
        raise SQLiteFormatError(
            f"WAL header checksum mismatch: stored {header.checksum1:08x}{header.checksum2:08x}, "
            f"computed {expected[0]:08x}{expected[1]:08x}"
        )
    return header


@dataclass(frozen=True)
class FrameHeader:
    """The 24-byte header in front of each WAL page."""

    pgno: int
    commit: int  # database size in pages for a commit frame, else 0
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int

    @property
    def is_commit(self) -> bool:
        """This frame ends a transaction."""
        return self.commit != 0


def parse_frame_header(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Decode a frame header (no validation: that needs the chain, see WALReader)."""
    if len(data) < WAL_FRAME_HEADER_SIZE:
        raise SQLiteFormatError(
            f"WAL frame header is too short: {len(data)} bytes, need {WAL_FRAME_HEADER_SIZE}"
        )
    return FrameHeader(*_FRAME_HEADER.unpack_from(data, 0))


def encode_wal_header(
    page_size: int,
    salt1: int,
    salt2: int,
    *,
    checkpoint_seq: int = 0,
    big_endian: bool = False,
) -> bytes:
    """Build a valid WAL header (for tests and for litefspy writing WALs of its own)."""
    magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    first = struct.pack(">6I", magic, WAL_FORMAT_VERSION, page_size, checkpoint_seq, salt1, salt2)
    s0, s1 = wal_checksum(first, 0, 0, big_endian)
    return first + struct.pack(">II", s0, s1)


def encode_frame(
    header: WALHeader, pgno: int, commit: int, page: bytes, chain: tuple[int, int]
) -> tuple[bytes, tuple[int, int]]:
    """Build a frame that continues `chain`; returns the frame bytes and the new chain."""
    if len(page) != header.page_size:
        raise ValueError(f"page is {len(page)} bytes, WAL page size is {header.page_size}")
    first = struct.pack(">II", pgno, commit)
    s0, s1 = frame_checksum(first, page, chain[0], chain[1], header.big_endian_checksums)
    return first + struct.pack(">4I", header.salt1, header.salt2, s0, s1) + page, (s0, s1)


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class Frame:
    """One valid frame: its file offset, header and page data."""

    offset: int
    header: FrameHeader
    data: bytes


@dataclass(frozen=True)
class WALTransaction:
    """A committed transaction: its frames span [start_offset, end_offset).

    `pages` maps each page number written to the file offset of the page data
    of its last frame in the transaction (the version that was committed).
    `checksum` is the running checksum after the commit frame, where the next
    transaction's chain starts.
    """

    start_offset: int
    end_offset: int
    commit: int
    pages: dict[int, int]
    frame_count: int
    checksum: tuple[int, int] = field(default=(0, 0))


class WALReader:
    """Reads the valid frames and committed transactions of a WAL file.

    Reading stops at the first frame that is short, has other salts than the
    header (left over from before a WAL restart), has page number 0, or breaks
    the checksum chain: SQLite ignores everything from there on too.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        f.seek(0)
        self.header = parse_wal_header(f.read(WAL_HEADER_SIZE))

    @property
    def frame_size(self) -> int:
        """Bytes per frame in this WAL."""
        return self.header.frame_size

    def frames(
        self, *, start: int = WAL_HEADER_SIZE, chain: tuple[int, int] | None = None
    ) -> Iterator[Frame]:
        """Yield valid frames in order.

        `start` and `chain` resume from a known point (a frame boundary and the
        running checksum after the frame before it); the default is the first
        frame, continuing the header's checksum.
        """
        header = self.header
        if (start - WAL_HEADER_SIZE) % header.frame_size:
            raise ValueError(f"WAL offset {start} is not on a frame boundary")
        s0, s1 = chain if chain is not None else (header.checksum1, header.checksum2)
        big_endian = header.big_endian_checksums
        frame_size = header.frame_size
        offset = start
        while True:
            # Seek every time: the caller may use the file between two frames.
            self._f.seek(offset)
            raw = self._f.read(frame_size)
            if len(raw) < frame_size:
                return
            fh = parse_frame_header(raw)
            if fh.salt1 != header.salt1 or fh.salt2 != header.salt2 or fh.pgno == 0:
                return
            view = memoryview(raw)
            s0, s1 = frame_checksum(view[:8], view[WAL_FRAME_HEADER_SIZE:], s0, s1, big_endian)
            if (s0, s1) != (fh.checksum1, fh.checksum2):
                return
            yield Frame(offset, fh, raw[WAL_FRAME_HEADER_SIZE:])
            offset += frame_size

    def transactions(
        self, *, start: int = WAL_HEADER_SIZE, chain: tuple[int, int] | None = None
    ) -> Iterator[WALTransaction]:
        """Yield committed transactions; valid frames after the last commit frame
        (a transaction still being written, or abandoned) are not yielded.

        With `PRAGMA powersafe_overwrite=0` SQLite pads a transaction with copies
        of its commit frame; each copy is a valid commit frame and comes out as
        a one-frame transaction rewriting the same page, as SQLite counts it.
        """
        pages: dict[int, int] = {}
        txn_start = start
        count = 0
        for frame in self.frames(start=start, chain=chain):
            pages[frame.header.pgno] = frame.offset + WAL_FRAME_HEADER_SIZE
            count += 1
            if frame.header.commit:
                end = frame.offset + self.frame_size
                yield WALTransaction(
                    start_offset=txn_start,
                    end_offset=end,
                    commit=frame.header.commit,
                    pages=pages,
                    frame_count=count,
                    checksum=(frame.header.checksum1, frame.header.checksum2),
                )
                pages = {}
                txn_start = end
                count = 0
