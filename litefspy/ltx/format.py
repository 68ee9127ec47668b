"""LTX v1 constants, header and trailer layouts, file names and positions.

Byte layouts follow FORMATS.md section 1 (what LiteFS writes); every integer is
big-endian. This module only packs, unpacks and validates: it does no I/O.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import PurePath

from litefspy.errors import LTXError
from litefspy.sqlite.header import MAX_PAGE_SIZE, MIN_PAGE_SIZE, is_valid_page_size, lock_page

# SQLite's own facts live in sqlite/ (LTX pages are SQLite pages): the page that
# holds SQLite's lock bytes is never stored in LTX.
lock_pgno = lock_page

MAGIC = b"LTX1"
HEADER_SIZE = 100
TRAILER_SIZE = 16
PAGE_HEADER_SIZE = 4
FLAG_COMPRESS = 0x1
CHECKSUM_FLAG = 1 << 63

# magic, flags, page size, commit, min txid, max txid, timestamp, pre-apply,
# wal offset, wal size, salt-1, salt-2, node id, 20 reserved bytes.  Timestamp,
# WAL offset and WAL size are signed because LiteFS declares them int64.
_HEADER = struct.Struct(">4sIIIQQqQqqIIQ20s")
_TRAILER = struct.Struct(">QQ")
_RESERVED = bytes(20)
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1

_FILENAME_RE = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.ltx")
_POS_RE = re.compile(r"([0-9a-fA-F]{16})/([0-9a-fA-F]{16})")

assert _HEADER.size == HEADER_SIZE
assert _TRAILER.size == TRAILER_SIZE


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise LTXError(f"invalid LTX header: {name} {value} out of range {low}..{high}")


@dataclass(frozen=True)
class Header:
    """The 100-byte LTX header; fields in file order."""

    flags: int
    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    timestamp: int
    pre_apply_checksum: int
    wal_offset: int
    wal_size: int
    wal_salt1: int
    wal_salt2: int
    node_id: int

    @property
    def is_snapshot(self) -> bool:
        """A snapshot starts at TXID 1 and holds every page of the database."""
        return self.min_txid == 1

    @property
    def compressed(self) -> bool:
        """True when the page block is one LZ4 frame."""
        return bool(self.flags & FLAG_COMPRESS)

    def validate(self) -> None:
        """Raise LTXError naming the first field that breaks a rule of FORMATS.md."""
        _check_range("flags", self.flags, 0, _U32)
        if self.flags & ~FLAG_COMPRESS:
            raise LTXError(f"invalid LTX header: flags 0x{self.flags:08x} has unknown bits set")
        if not is_valid_page_size(self.page_size):
            raise LTXError(
                f"invalid LTX header: page size {self.page_size} is not a power of two "
                f"in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}"
            )
        _check_range("commit", self.commit, 0, _U32)
        _check_range("min TXID", self.min_txid, 0, _U64)
        _check_range("max TXID", self.max_txid, 0, _U64)
        if self.min_txid == 0:
            raise LTXError("invalid LTX header: min TXID must be > 0")
        if self.max_txid < self.min_txid:
            raise LTXError(
                f"invalid LTX header: max TXID {self.max_txid} < min TXID {self.min_txid}"
            )
        _check_range("timestamp", self.timestamp, _I64_MIN, _I64_MAX)
        _check_range("pre-apply checksum", self.pre_apply_checksum, 0, _U64)
        if self.is_snapshot:
            if self.pre_apply_checksum != 0:
                raise LTXError(
                    "invalid LTX header: pre-apply checksum must be 0 in a snapshot "
                    f"(got {self.pre_apply_checksum:016x})"
                )
        elif not self.pre_apply_checksum & CHECKSUM_FLAG:
            raise LTXError(
                "invalid LTX header: pre-apply checksum of an incremental file must have "
                f"bit 63 set (got {self.pre_apply_checksum:016x})"
            )
        _check_range("WAL offset", self.wal_offset, 0, _I64_MAX)
        _check_range("WAL size", self.wal_size, 0, _I64_MAX)
        _check_range("WAL salt-1", self.wal_salt1, 0, _U32)
        _check_range("WAL salt-2", self.wal_salt2, 0, _U32)
        _check_range("node ID", self.node_id, 0, _U64)
        # Offset and size describe the same run of WAL frames, and frames never
        # start at offset 0 (the WAL header is there): both are 0 (rollback
        # journal) or both are set.  Salts only exist for WAL transactions.
        if (self.wal_offset == 0) != (self.wal_size == 0):
            raise LTXError(
                f"invalid LTX header: WAL offset {self.wal_offset} and WAL size "
                f"{self.wal_size} must both be 0 or both be set"
            )
        if (self.wal_salt1 or self.wal_salt2) and self.wal_offset == 0:
            raise LTXError("invalid LTX header: WAL salt set without a WAL offset")

    def encode(self) -> bytes:
        """Validate and pack into the 100-byte on-disk form."""
        self.validate()
        return _HEADER.pack(
            MAGIC,
            self.flags,
            self.page_size,
            self.commit,
            self.min_txid,
            self.max_txid,
            self.timestamp,
            self.pre_apply_checksum,
            self.wal_offset,
            self.wal_size,
            self.wal_salt1,
            self.wal_salt2,
            self.node_id,
            _RESERVED,
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Header:
        """Unpack and validate a 100-byte header."""
        if len(data) < HEADER_SIZE:
            raise LTXError(f"truncated LTX header: {len(data)} of {HEADER_SIZE} bytes")
        fields = _HEADER.unpack_from(data)
        magic, reserved = fields[0], fields[-1]
        if magic != MAGIC:
            raise LTXError(f"not an LTX file: bad magic {bytes(magic)!r} (expected {MAGIC!r})")
        if reserved != _RESERVED:
            raise LTXError("invalid LTX header: reserved bytes 80..99 are not zero")
        header = cls(*fields[1:-1])
        header.validate()
        return header


@dataclass(frozen=True)
class Trailer:
    """The 16-byte LTX trailer."""

    post_apply_checksum: int
    file_checksum: int

    def validate(self, commit: int | None = None) -> None:
        """Check the flag bits (and, given the header's commit, the empty-database rule)."""
        _check_range("post-apply checksum", self.post_apply_checksum, 0, _U64)
        _check_range("file checksum", self.file_checksum, 0, _U64)
        if not self.post_apply_checksum & CHECKSUM_FLAG:
            raise LTXError(
                f"invalid LTX trailer: post-apply checksum {self.post_apply_checksum:016x} "
                "lacks bit 63"
            )
        if commit == 0 and self.post_apply_checksum != CHECKSUM_FLAG:
            raise LTXError(
                "invalid LTX trailer: post-apply checksum of a deleted database (commit 0) "
                f"must be {CHECKSUM_FLAG:016x}, got {self.post_apply_checksum:016x}"
            )
        if not self.file_checksum & CHECKSUM_FLAG:
            raise LTXError(
                f"invalid LTX trailer: file checksum {self.file_checksum:016x} lacks bit 63"
            )

    def encode(self) -> bytes:
        """Pack into the 16-byte on-disk form."""
        _check_range("post-apply checksum", self.post_apply_checksum, 0, _U64)
        _check_range("file checksum", self.file_checksum, 0, _U64)
        return _TRAILER.pack(self.post_apply_checksum, self.file_checksum)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Trailer:
        """Unpack 16 bytes; flag rules are checked by validate() (needs the header)."""
        if len(data) != TRAILER_SIZE:
            raise LTXError(f"truncated LTX trailer: {len(data)} of {TRAILER_SIZE} bytes")
        post, file_ck = _TRAILER.unpack(data)
        return cls(post, file_ck)


def format_filename(min_txid: int, max_txid: int) -> str:
    """`%016x-%016x.ltx`, the name LiteFS gives an LTX file."""
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_filename(name: str) -> tuple[int, int]:
    """(min TXID, max TXID) from an LTX file name (a path's last component is used)."""
    base = PurePath(name).name
    match = _FILENAME_RE.fullmatch(base)
    if match is None:
        raise LTXError(f"not an LTX file name: {name!r} (expected %016x-%016x.ltx)")
    min_txid, max_txid = int(match[1], 16), int(match[2], 16)
    if min_txid == 0 or max_txid < min_txid:
        raise LTXError(f"invalid TXID range in LTX file name: {name!r}")
    return min_txid, max_txid


def format_pos(txid: int, checksum: int) -> str:
    """A replication position, `TXID/post-apply checksum` as `%016x/%016x`."""
    return f"{txid:016x}/{checksum:016x}"


def parse_pos(text: str) -> tuple[int, int]:
    """(TXID, checksum) from `%016x/%016x`; surrounding whitespace (a newline) is allowed."""
    match = _POS_RE.fullmatch(text.strip())
    if match is None:
        raise LTXError(f"not a position: {text!r} (expected %016x/%016x)")
    return int(match[1], 16), int(match[2], 16)
