"""The -shm file (WAL index) as far as litefspy touches it: lock slots and a fresh header.

FORMATS.md: SQLite's unix VFS locks bytes of -shm (write, checkpoint, recover,
then the read marks), and a reader trusts the WAL-index header at its start.
"""

from __future__ import annotations

import secrets
import struct
import sys

from litefspy.sqlite.wal import wal_checksum

__all__ = [
    "SHM_CKPT",
    "SHM_DMS",
    "SHM_NLOCK",
    "SHM_READ0",
    "SHM_WRITE",
    "WAL_INDEX_HEADER_SIZE",
    "build_wal_index",
]

# -shm lock bytes: write, checkpoint, recover, then five read marks.
SHM_WRITE = 120
SHM_CKPT = 121
SHM_READ0 = 123
SHM_NLOCK = 8
SHM_DMS = SHM_WRITE + SHM_NLOCK  # dead-man switch: shared while a connection is open

WAL_INDEX_HEADER_SIZE = 48
_READMARK_NOT_USED = 0xFFFFFFFF
_NATIVE = "<" if sys.byteorder == "little" else ">"


def build_wal_index(old_header: bytes, page_size: int) -> bytes:
    """The first 136 bytes of -shm for an empty WAL: two header copies + checkpoint info.

    WalIndexHdr (native byte order): iVersion, unused, iChange, isInit, bigEndCksum,
    szPage, mxFrame, nPage, aFrameCksum[2], aSalt[2], aCksum[2]; aCksum is SQLite's
    WAL checksum over the first 40 bytes in native order. mxFrame = nPage = 0 tells
    readers to read every page from the database file (nPage 0: use the file size).
    """
    change = secrets.randbits(32)
    if len(old_header) == WAL_INDEX_HEADER_SIZE:
        (old_change,) = struct.unpack_from(_NATIVE + "I", old_header, 8)
        if old_header[12]:
            change = (old_change + 1) & 0xFFFFFFFF
    sz = (page_size & 0xFF00) | (page_size >> 16)
    body = struct.pack(
        _NATIVE + "IIIBBHIIIIII",
        3007000,
        0,
        change,
        1,
        1 if sys.byteorder == "big" else 0,
        sz,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    ck = wal_checksum(body, 0, 0, sys.byteorder == "big")
    header = body + struct.pack(_NATIVE + "II", *ck)
    ckpt = struct.pack(
        _NATIVE + "6I8sII",
        0,  # nBackfill
        0,  # aReadMark[0]
        0,  # aReadMark[1]
        _READMARK_NOT_USED,
        _READMARK_NOT_USED,
        _READMARK_NOT_USED,
        bytes(8),
        0,
        0,
    )
    return header + header + ckpt
