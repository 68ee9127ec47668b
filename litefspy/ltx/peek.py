"""Reading an LTX file's header and trailer without decoding (or verifying) its pages.

The one home of the "first 100 and last 16 bytes" peek: retention, recovery,
events, backups and the replication server decide from these alone.
"""

from __future__ import annotations

import os

from litefspy.errors import LTXError
from litefspy.fsutil import StrPath
from litefspy.ltx.format import HEADER_SIZE, TRAILER_SIZE, Header, Trailer


def read_header(path: StrPath) -> Header:
    """An LTX file's header (its first 100 bytes)."""
    with open(path, "rb") as f:
        return Header.decode(f.read(HEADER_SIZE))


def read_trailer(path: StrPath) -> Trailer:
    """An LTX file's trailer (its last 16 bytes), not validated."""
    with open(path, "rb") as f:
        f.seek(-TRAILER_SIZE, os.SEEK_END)
        return Trailer.decode(f.read(TRAILER_SIZE))


def ends_of(fd: int, size: int, name: StrPath) -> tuple[Header, Trailer]:
    """Header and validated trailer of the open LTX file `fd` of `size` bytes."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise LTXError(f"{os.fspath(name)}: truncated LTX file ({size} bytes)")
    header = Header.decode(os.pread(fd, HEADER_SIZE, 0))
    trailer = Trailer.decode(os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE))
    trailer.validate(header.commit)
    return header, trailer


def read_ends(path: StrPath) -> tuple[Header, Trailer]:
    """An LTX file's header and validated trailer, without reading its pages."""
    with open(path, "rb") as f:
        return ends_of(f.fileno(), os.fstat(f.fileno()).st_size, path)


def post_apply_checksum(path: StrPath) -> int:
    """The post-apply checksum in an LTX file's trailer (its last 16 bytes)."""
    with open(path, "rb") as f:
        f.seek(-TRAILER_SIZE, os.SEEK_END)
        return int.from_bytes(f.read(8), "big")
