"""Streaming LTX v1 reader and whole-file verification."""

from __future__ import annotations

import io
import os
import struct
from array import array
from collections.abc import Iterator
from typing import Any, BinaryIO, TypeAlias

from litefspy.errors import LTXChecksumError, LTXError
from litefspy.fsutil import StrPath
from litefspy.ltx.checksum import crc64
from litefspy.ltx.checksum import crc64_unwrapped as _crc
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    HEADER_SIZE,
    PAGE_HEADER_SIZE,
    TRAILER_SIZE,
    Header,
    Trailer,
    lock_pgno,
)
from litefspy.ltx.lz4body import LZ4Body

# Compressed input is read in modest chunks, and decompressed output is capped
# per call, so a highly compressible body (zero pages compress ~250:1) never
# inflates into a huge buffer.
_RAW_CHUNK = 1 << 20
# A restore's download hands out chunks of 1 MiB or a little more: asking for
# more than that takes each one whole, without slicing a copy out of it.
_LZ4_RAW_CHUNK = 4 << 20
_OUT_CHUNK = 4 << 20
_u32 = struct.Struct(">I").unpack_from  # a page number from a record, in place

# (page numbers, pages, their checksums): what one decompressed chunk held.
PageBatch: TypeAlias = "tuple[list[int], list[Any], array[int]]"


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes, retrying short reads; fewer only at end of file."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    have = len(data)
    while have < n:
        more = f.read(n - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


class _Body:
    """The uncompressed bytes of the page block, served in exact-size reads.

    Reads the underlying file in chunks, so it may read past the end of the
    page block; rest() hands back what it holds beyond that (the trailer).
    """

    def __init__(self, f: BinaryIO, compressed: bool) -> None:
        self._f = f
        self._lz = LZ4Body(f, _LZ4_RAW_CHUNK, _OUT_CHUNK) if compressed else None
        self._data = b""
        self._pos = 0

    def _more(self) -> bytes:
        """Next chunk of uncompressed body; b"" at the end of the file or LZ4 frame."""
        if self._lz is None:
            return self._f.read(_RAW_CHUNK)
        return self._lz.more()

    def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer if the body ends first."""
        end = self._pos + n
        if end <= len(self._data):
            out = self._data[self._pos : end]
            self._pos = end
            return out
        parts = [self._data[self._pos :]]
        have = len(parts[0])
        while have < n:
            chunk = self._more()
            if not chunk:
                self._data, self._pos = b"", 0
                return b"".join(parts)
            take = n - have
            parts.append(chunk[:take])
            have += min(take, len(chunk))
            self._data, self._pos = chunk, min(take, len(chunk))
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put `data` (the end of the last read) back in front of what follows."""
        if data:
            self._data, self._pos = data + self._data[self._pos :], 0

    def rest(self) -> bytes:
        """Bytes after the page block that were already read from the file.

        For a compressed body the LZ4 frame must end right after the
        terminator: any further decompressed byte is an error.
        """
        leftover = self._data[self._pos :]
        self._data, self._pos = b"", 0
        if self._lz is None:
            return leftover
        if leftover or self._more():
            raise LTXError("corrupt: data after the page-block terminator inside the LZ4 frame")
        return self._lz.unused_data or b""


class Decoder:
    """Reads one LTX file from an open binary stream.

    The header is read and validated at construction.  pages() streams the
    pages, checking the format's rules as it goes; once exhausted, it has
    read the trailer, required the end of the file, and verified the file
    checksum (LTXChecksumError on mismatch), and `trailer` is set.
    """

    header: Header

    def __init__(self, f: BinaryIO) -> None:
        raw = _read_exactly(f, HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise LTXError(f"truncated: {len(raw)} bytes, shorter than the LTX header")
        self.header = Header.decode(raw)
        self._f = f
        self._crc = crc64(raw)
        self._trailer: Trailer | None = None
        self._started = False

    @property
    def trailer(self) -> Trailer:
        """The verified trailer; only available once pages() is exhausted."""
        if self._trailer is None:
            raise LTXError("LTX trailer not read yet: iterate pages() to the end first")
        return self._trailer

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """Yield (pgno, page bytes) in file order, then verify the trailer."""
        for pgnos, pages, _ in self._batches(checksums=False, views=False):
            yield from zip(pgnos, pages, strict=True)

    def pages_with_checksums(self) -> Iterator[tuple[int, bytes, int]]:
        """`pages()` with each page's checksum (`page_checksum(pgno, data)`).

        The checksum is computed from the page's record as stored (the page
        number then the page), so no second pass over the page is needed.
        """
        for pgnos, pages, checksums in self._batches(checksums=True, views=False):
            yield from zip(pgnos, pages, checksums, strict=True)

    def page_batches(self) -> Iterator[PageBatch]:
        """The pages with their checksums, a batch per decompressed chunk (then the trailer).

        For bulk consumers (restore, snapshots): no per-page generator step,
        and each page is a view into the chunk, not a copy. The views stay
        valid as long as they are referenced.
        """
        return self._batches(checksums=True, views=True)

    def _batches(self, *, checksums: bool, views: bool) -> Iterator[PageBatch]:
        """(pgnos, pages, their checksums or 0) per chunk, checking the format's rules.

        The hot loop takes whole records (page number, then page) straight
        from the decompressed chunk in hand; only a record split across two
        chunks, and the terminator, go through `_Body.read`. A read at the
        terminator may take bytes from beyond it (the trailer of an
        uncompressed file, or stray data in an LZ4 frame): they go back to
        the body for the trailer checks.
        """
        if self._started:
            raise LTXError("LTX decoder: pages() can be iterated only once")
        self._started = True
        header = self.header
        page_size = header.page_size
        record_size = PAGE_HEADER_SIZE + page_size
        commit = header.commit
        lock = lock_pgno(page_size)
        snapshot = header.is_snapshot
        body = _Body(self._f, header.compressed)
        crc = self._crc
        last = 0
        while True:
            # Fast path: every whole record of the current chunk.
            data, pos = body._data, body._pos
            limit = len(data) - record_size
            if pos <= limit:
                view = memoryview(data)
                source = view if views else data
                pgnos: list[int] = []
                pages: list[bytes | memoryview] = []
                sums = array("Q")
                while pos <= limit:
                    pgno = _u32(data, pos)[0]
                    if pgno == 0 or pgno <= last or pgno > commit or pgno == lock:
                        break  # the terminator, or an error: the slow path says which
                    if snapshot and pgno != (last + 2 if last + 1 == lock else last + 1):
                        break
                    record = view[pos : pos + record_size]
                    crc = _crc(record, crc)
                    last = pgno
                    pos += record_size
                    pgnos.append(pgno)
                    pages.append(source[pos - page_size : pos])
                    sums.append(CHECKSUM_FLAG | _crc(record) if checksums else 0)
                body._pos = pos
                if pgnos:
                    yield pgnos, pages, sums
            # Slow path: one record across chunks, the terminator, or an error.
            raw = body.read(record_size)
            if len(raw) < PAGE_HEADER_SIZE:
                raise LTXError(
                    f"truncated: the page block ends after page {last} without its terminator"
                )
            pgno = int.from_bytes(raw[:PAGE_HEADER_SIZE], "big")
            if pgno == 0:
                body.unread(raw[PAGE_HEADER_SIZE:])
                crc = _crc(raw[:PAGE_HEADER_SIZE], crc)
                break
            if pgno <= last:
                raise LTXError(f"corrupt: page {pgno} follows page {last} (must ascend)")
            if pgno > commit:
                raise LTXError(f"corrupt: page {pgno} is above commit {commit}")
            if pgno == lock:
                raise LTXError(f"corrupt: page {pgno} is the lock page, which is never stored")
            if snapshot:
                expected = last + 2 if last + 1 == lock else last + 1
                if pgno != expected:
                    raise LTXError(f"corrupt: snapshot is missing page {expected}")
            if len(raw) < record_size:
                raise LTXError(f"truncated: the file ends inside page {pgno}")
            crc = _crc(raw, crc)
            last = pgno
            checksum = (CHECKSUM_FLAG | _crc(raw)) if checksums else 0
            yield [pgno], [raw[PAGE_HEADER_SIZE:]], array("Q", [checksum])
        if snapshot:
            expected_last = commit - 1 if commit == lock else commit
            if last != expected_last:
                nxt = last + 2 if last + 1 == lock else last + 1
                raise LTXError(f"corrupt: snapshot is missing page {nxt} (commit {commit})")
        self._trailer = self._read_trailer(body, crc)

    def _read_trailer(self, body: _Body, crc: int) -> Trailer:
        tail = body.rest()
        if len(tail) < TRAILER_SIZE:
            tail += _read_exactly(self._f, TRAILER_SIZE - len(tail))
        if len(tail) < TRAILER_SIZE:
            raise LTXError(f"truncated: trailer is {len(tail)} of {TRAILER_SIZE} bytes")
        extra = len(tail) - TRAILER_SIZE
        if not extra:
            extra = len(self._f.read(1))
        if extra:
            raise LTXError("trailing garbage: data after the 16-byte trailer")
        trailer = Trailer.decode(tail)
        crc = crc64(tail[:8], crc)
        computed = CHECKSUM_FLAG | crc
        if trailer.file_checksum != computed:
            raise LTXChecksumError(
                f"file checksum mismatch: trailer says {trailer.file_checksum:016x}, "
                f"contents give {computed:016x}"
            )
        trailer.validate(self.header.commit)
        return trailer


def _with_name(exc: LTXError, path: StrPath) -> LTXError:
    """Same error class, message prefixed with the file it is about."""
    return type(exc)(f"{os.fspath(path)}: {exc}")


def verify_file(path: StrPath) -> tuple[Header, Trailer]:
    """Fully check one LTX file; raises LTXError naming the file on any failure.

    Checks the header rules, page order, the end of file, the file checksum,
    and for snapshots also that the pages' database checksum equals the
    post-apply checksum.
    """
    header, trailer, _ = _check_file(path, keep=False)
    return header, trailer


def read_verified(path: StrPath) -> tuple[Header, Trailer, list[tuple[int, bytes]]]:
    """`verify_file`, keeping the decoded pages: a caller that then writes them
    (a replica's apply of a small file) decodes the file once, not twice."""
    return _check_file(path, keep=True)


def read_verified_bytes(
    data: bytes, name: str = "received LTX file"
) -> tuple[Header, Trailer, list[tuple[int, bytes]]]:
    """`read_verified` of a whole LTX file held in memory (a replica's received
    file is verified and applied from the bytes, with no copy on disk first)."""
    return _check_file(data, keep=True, name=name)


def _check_file(
    source: StrPath | bytes, *, keep: bool, name: str = ""
) -> tuple[Header, Trailer, list[tuple[int, bytes]]]:
    pages: list[tuple[int, bytes]] = []
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
            dec = Decoder(f)
            snapshot = dec.header.is_snapshot
            xor = 0
            if snapshot:  # its pages must add up to its post-apply checksum
                for pgno, data, checksum in dec.pages_with_checksums():
                    xor ^= checksum
                    if keep:
                        pages.append((pgno, data))
            else:
                for page in dec.pages():
                    if keep:
                        pages.append(page)
            trailer = dec.trailer
        if snapshot and trailer.post_apply_checksum != CHECKSUM_FLAG | xor:
            raise LTXChecksumError(
                f"snapshot post-apply checksum {trailer.post_apply_checksum:016x} does not "
                f"match its pages ({CHECKSUM_FLAG | xor:016x})"
            )
    except LTXError as exc:
        raise _with_name(exc, name if isinstance(source, bytes) else source) from exc
    return dec.header, trailer, pages
