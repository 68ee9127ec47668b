"""The LZ4 frame of a compressed LTX body, decompressed in chunks.

LTX bodies are standard LZ4 frames (the LZ4 frame format, lz4/doc). python-lz4's
frame decompressor moves every byte through its own buffers: about 470 MB/s
here even for blocks stored uncompressed (random data, SQLite pages of
blobs), which made it a quarter of a restore's CPU time. The frames litefspy
writes (ltx/encoder.py: independent 64 KiB blocks, no checksums of LZ4's own)
are walked block by block instead: a stored block is sliced, not copied
twice, and a compressed one goes to python-lz4's block decompressor. Any
other frame (linked blocks, a dictionary, LZ4 checksums: what other writers
may produce) goes through python-lz4's frame decompressor as before, so every
valid frame still decodes. The frame header's own checksum is checked by
python-lz4 in both cases.

Written by hand because no maintained Python package exposes the frame's
blocks; the block decoding itself stays python-lz4's.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import lz4.block
import lz4.frame

from litefspy.errors import LTXError

MAGIC = 0x184D2204
_FLG_VERSION = 0xC0
_FLG_INDEPENDENT = 0x20
_FLG_BLOCK_CHECKSUM = 0x10
_FLG_CONTENT_SIZE = 0x08
_FLG_CONTENT_CHECKSUM = 0x04
_FLG_DICT_ID = 0x01
_BLOCK_MAX = {4: 64 << 10, 5: 256 << 10, 6: 1 << 20, 7: 4 << 20}
_STORED = 0x80000000
_u32le = struct.Struct("<I").unpack_from


def _corrupt(what: str) -> LTXError:
    return LTXError(f"corrupt LZ4-compressed body: {what}")


_TRUNCATED = "truncated: the file ends inside the LZ4-compressed body"


class LZ4Body:
    """Decompressed chunks of the LZ4 frame that starts at `f`'s position."""

    def __init__(self, f: BinaryIO, raw_chunk: int, out_chunk: int) -> None:
        self._f = f
        self._raw_chunk = raw_chunk
        self._out_chunk = out_chunk
        self._raw = b""
        self._pos = 0
        self._started = False
        self._block_max = 0
        self._slow: lz4.frame.LZ4FrameDecompressor | None = None
        self.eof = False
        self.unused_data = b""  # bytes read past the end of the frame

    def _take(self, n: int) -> bytes | memoryview:
        """The next n raw bytes (a view into the chunk in hand when they are in it)."""
        raw, pos = self._raw, self._pos
        if pos == len(raw):
            raw, pos = self._f.read(max(self._raw_chunk, n)), 0
            self._raw = raw
        end = pos + n
        if end <= len(raw):
            self._pos = end
            return memoryview(raw)[pos:end]
        # Straddles two reads: only this piece is joined, never a whole chunk.
        parts = [raw[pos:]]
        have = len(parts[0])
        while have < n:
            more = self._f.read(n - have)
            if not more:
                raise LTXError(_TRUNCATED)
            parts.append(more)
            have += len(more)
        self._raw, self._pos = b"", 0
        return b"".join(parts)

    def _start(self) -> None:
        """Read the frame header; fall back to python-lz4 for frames it does not fit."""
        self._started = True
        fixed = bytes(self._take(7))
        if _u32le(fixed)[0] != MAGIC:
            raise _corrupt("no LZ4 frame magic number")
        flg, bd = fixed[4], fixed[5]
        extra = (8 if flg & _FLG_CONTENT_SIZE else 0) + (4 if flg & _FLG_DICT_ID else 0)
        header = fixed + bytes(self._take(extra))
        simple = (
            flg & _FLG_VERSION == 0x40
            and flg & _FLG_INDEPENDENT
            and not flg
            & (_FLG_BLOCK_CHECKSUM | _FLG_CONTENT_CHECKSUM | _FLG_CONTENT_SIZE | _FLG_DICT_ID)
            and (bd >> 4) & 7 in _BLOCK_MAX
        )
        if not simple:
            # python-lz4 from the frame's first byte on.
            self._raw, self._pos = header + self._raw[self._pos :], 0
            self._slow = lz4.frame.LZ4FrameDecompressor()
            return
        # python-lz4 checks the header (version, reserved bits, its checksum).
        try:
            if lz4.frame.LZ4FrameDecompressor().decompress(header):
                raise _corrupt("data in the frame header")
        except RuntimeError as exc:
            raise _corrupt(str(exc)) from exc
        self._block_max = _BLOCK_MAX[(bd >> 4) & 7]

    def more(self) -> bytes:
        """The next chunk of decompressed bytes; b"" after the end of the frame."""
        if not self._started:
            self._start()
        if self._slow is not None:
            return self._more_slow(self._slow)
        if self.eof:
            return b""
        parts: list[bytes | memoryview] = []
        size = 0
        block_max = self._block_max
        while size < self._out_chunk:
            n = _u32le(self._take(4))[0]
            if n == 0:  # the end mark
                self.eof = True
                self.unused_data = self._raw[self._pos :]
                self._raw, self._pos = b"", 0
                break
            stored = n & _STORED
            n &= ~_STORED
            if n > block_max:
                raise _corrupt(f"a block of {n} bytes in a frame of {block_max}-byte blocks")
            block = self._take(n)
            if stored:
                parts.append(block)
                size += n
            else:
                try:
                    out = lz4.block.decompress(block, uncompressed_size=block_max)
                except lz4.block.LZ4BlockError as exc:
                    raise _corrupt(str(exc)) from exc
                parts.append(out)
                size += len(out)
        return b"".join(parts)

    def _more_slow(self, lz: lz4.frame.LZ4FrameDecompressor) -> bytes:
        out: bytes
        try:
            while not lz.eof:
                if lz.needs_input:
                    if self._pos < len(self._raw):
                        raw, self._raw, self._pos = self._raw[self._pos :], b"", 0
                    else:
                        raw = self._f.read(self._raw_chunk)
                    if not raw:
                        raise LTXError(_TRUNCATED)
                    out = lz.decompress(raw, max_length=self._out_chunk)
                else:
                    out = lz.decompress(b"", max_length=self._out_chunk)
                if out:
                    return out
        except RuntimeError as exc:
            # python-lz4 reports every frame decoding failure as RuntimeError.
            raise _corrupt(str(exc)) from exc
        self.eof = True
        self.unused_data = lz.unused_data or b""
        return b""
