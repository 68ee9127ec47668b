"""Streaming LTX v1 writer, and the one snapshot encoder (`encode_snapshot`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import BinaryIO

import lz4.frame

from litefspy.errors import LTXError
from litefspy.fsutil import StrPath, atomic_write
from litefspy.ltx.checksum import crc64, page_checksum
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    PAGE_HEADER_SIZE,
    Header,
    Trailer,
    lock_pgno,
)

# Pages are gathered into one buffer and checksummed, compressed and written in
# one call each: per-page calls into the CRC, LZ4 and the file cost more than
# the work itself at small page sizes.
_FLUSH_BYTES = 1 << 20
_TERMINATOR = bytes(PAGE_HEADER_SIZE)


def new_lz4_compressor() -> lz4.frame.LZ4FrameCompressor:
    """The LZ4 frame settings of LTX bodies.

    A standard frame of independent 64 KiB blocks (no back-references across
    blocks), which every LZ4 frame decoder reads, including the Go one LiteFS
    uses. No content checksum: the LTX file checksum (CRC-64 over the
    uncompressed page block, checked before anything is applied) already
    covers every byte, and python-lz4's xxHash pass, like 4 MiB blocks, made
    decoding about three times slower (restore and replica apply are
    CPU-bound on it). Frames written with other settings still decode.
    """
    return lz4.frame.LZ4FrameCompressor(
        block_size=lz4.frame.BLOCKSIZE_MAX64KB,
        block_linked=False,
        content_checksum=False,
        auto_flush=False,
    )


class Encoder:
    """Writes one LTX file to an open binary stream, page by page.

    The header is written at construction.  Pages must come in strictly
    ascending order; a snapshot must contain every page 1..commit except the
    lock page.  finish() writes the terminator and trailer; the caller owns
    the stream (closing, fsync).
    """

    def __init__(self, f: BinaryIO, header: Header) -> None:
        raw = header.encode()  # validates
        self.header = header
        self._f = f
        self._page_size = header.page_size
        self._lock = lock_pgno(header.page_size)
        self._last = 0
        self._finished = False
        self._buf = bytearray()
        self._crc = crc64(raw)
        self._lz: lz4.frame.LZ4FrameCompressor | None = None
        f.write(raw)
        if header.compressed:
            self._lz = new_lz4_compressor()
            f.write(self._lz.begin())

    @property
    def last_pgno(self) -> int:
        """Highest page number written so far (0 before the first page)."""
        return self._last

    def _next_snapshot_pgno(self) -> int:
        nxt = self._last + 1
        return nxt + 1 if nxt == self._lock else nxt

    def write_page(self, pgno: int, data: bytes | bytearray | memoryview) -> None:
        """Append one page; raises LTXError for anything the format forbids."""
        if self._finished:
            raise LTXError("LTX encoder: write_page after finish")
        header = self.header
        if pgno < 1:
            raise LTXError(f"LTX encoder: invalid page number {pgno}")
        if pgno <= self._last:
            raise LTXError(
                f"LTX encoder: page {pgno} out of order (previous page {self._last}); "
                "pages must be strictly ascending"
            )
        if pgno > header.commit:
            raise LTXError(f"LTX encoder: page {pgno} is above commit {header.commit}")
        if pgno == self._lock:
            raise LTXError(f"LTX encoder: page {pgno} is the lock page and is never encoded")
        if len(data) != self._page_size:
            raise LTXError(
                f"LTX encoder: page {pgno} is {len(data)} bytes, page size is {self._page_size}"
            )
        if header.is_snapshot and pgno != self._next_snapshot_pgno():
            raise LTXError(
                f"LTX encoder: snapshot is missing page {self._next_snapshot_pgno()} "
                f"(got page {pgno})"
            )
        buf = self._buf
        buf += pgno.to_bytes(PAGE_HEADER_SIZE, "big")
        buf += data
        self._last = pgno
        if len(buf) >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        buf = self._buf
        if not buf:
            return
        self._crc = crc64(buf, self._crc)
        if self._lz is None:
            self._f.write(buf)
        else:
            out = self._lz.compress(buf)
            if out:
                self._f.write(out)
        self._buf = bytearray()

    def finish(self, post_apply_checksum: int) -> Trailer:
        """Write the terminator and trailer; returns the trailer with the file checksum."""
        if self._finished:
            raise LTXError("LTX encoder: finish called twice")
        header = self.header
        if header.is_snapshot:
            expected_last = header.commit - 1 if header.commit == self._lock else header.commit
            if self._last != expected_last:
                raise LTXError(
                    f"LTX encoder: snapshot is missing page {self._next_snapshot_pgno()} "
                    f"(commit {header.commit})"
                )
        # Validate the post-apply checksum before anything else reaches the file.
        Trailer(post_apply_checksum, CHECKSUM_FLAG).validate(header.commit)
        self._buf += _TERMINATOR
        self._flush()
        if self._lz is not None:
            self._f.write(self._lz.flush())
        crc = crc64(post_apply_checksum.to_bytes(8, "big"), self._crc)
        trailer = Trailer(post_apply_checksum, CHECKSUM_FLAG | crc)
        self._f.write(trailer.encode())
        self._finished = True
        return trailer


def write_ltx_file(
    path: StrPath,
    header: Header,
    pages: Iterable[tuple[int, bytes | bytearray | memoryview]],
    post_apply_checksum: int,
) -> Trailer:
    """Write a complete LTX file durably: temp name, fsync, rename, fsync dir."""
    with atomic_write(path) as f:
        enc = Encoder(f, header)
        for pgno, data in pages:
            enc.write_page(pgno, data)
        return enc.finish(post_apply_checksum)


def encode_snapshot(
    out: BinaryIO,
    header: Header,
    pages: Iterable[tuple[int, bytes | bytearray | memoryview]],
    *,
    on_page: Callable[[], None] | None = None,
    check: Callable[[int], None] | None = None,
) -> Trailer:
    """Encode a whole database state as an LTX snapshot into `out` (not synced).

    `pages` are every page of the state in order; the lock page, if among them,
    is skipped. The post-apply checksum is computed on the way. `on_page` is
    called after each page; `check` gets the checksum before the trailer is
    written and may raise to refuse the snapshot.
    """
    lock = lock_pgno(header.page_size)
    enc = Encoder(out, header)
    write_page = enc.write_page
    xor = 0
    for pgno, data in pages:
        if pgno == lock:
            continue
        xor ^= page_checksum(pgno, data)
        write_page(pgno, data)
        if on_page is not None:
            on_page()
    total = CHECKSUM_FLAG | xor
    if check is not None:
        check(total)
    return enc.finish(total)
