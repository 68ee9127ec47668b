"""The LZ4 frame reader of LTX bodies: every valid frame decodes, damage is an LTXError."""

from __future__ import annotations

import io
import os

import lz4.frame
import pytest

from litefspy.errors import LTXError
from litefspy.ltx.encoder import new_lz4_compressor
from litefspy.ltx.lz4body import LZ4Body

# Incompressible pages (stored blocks), zero pages and text (compressed blocks).
DATA = b"".join(
    os.urandom(4096) if i % 3 == 0 else bytes(4096) if i % 3 == 1 else b"page %d " % i * 400
    for i in range(200)
)
TRAILER = b"sixteen bytes..."


class Dribble(io.RawIOBase):
    """A file that returns at most `step` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._step, len(self._data))
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def _ours(data: bytes) -> bytes:
    c = new_lz4_compressor()
    return c.begin() + c.compress(data) + c.flush()


def _decode(f: io.RawIOBase | io.BytesIO, raw_chunk: int = 1 << 20) -> tuple[bytes, bytes, bool]:
    body = LZ4Body(f, raw_chunk, 64 << 10)  # type: ignore[arg-type]
    parts = []
    while chunk := body.more():
        parts.append(chunk)
    assert body.eof
    return b"".join(parts), body.unused_data + f.read(), body._slow is None


@pytest.mark.parametrize("step", [1, 5, 4099, 70000, 1 << 20])
def test_our_frames_decode_block_by_block(step: int) -> None:
    data, rest, fast = _decode(Dribble(_ours(DATA) + TRAILER, step), raw_chunk=step)
    assert data == DATA
    assert rest == TRAILER
    assert fast  # no python-lz4 frame decompressor involved


@pytest.mark.parametrize(
    "settings",
    [
        {"block_linked": True},
        {"content_checksum": True},
        {"block_checksum": True},
        {"store_size": True},
        {"block_size": lz4.frame.BLOCKSIZE_MAX4MB},
        {"block_size": lz4.frame.BLOCKSIZE_MAX1MB, "block_linked": False},
    ],
)
def test_frames_of_other_writers_decode(settings: dict[str, object]) -> None:
    frame = lz4.frame.compress(DATA, **settings)  # type: ignore[arg-type]
    for step in (3, 1 << 20):
        data, rest, _ = _decode(Dribble(frame + TRAILER, step))
        assert data == DATA
        assert rest == TRAILER


def _expect_error(frame: bytes, match: str) -> None:
    with pytest.raises(LTXError, match=match):
        _decode(io.BytesIO(frame))


def test_damaged_frames_are_refused() -> None:
    frame = _ours(DATA)
    _expect_error(b"\0" + frame[1:], "no LZ4 frame magic number")
    bad_header = bytearray(frame)
    bad_header[6] ^= 0xFF  # the frame header's checksum
    _expect_error(bytes(bad_header), "corrupt LZ4-compressed body")
    oversized = bytearray(frame)
    oversized[7:11] = (70000).to_bytes(4, "little")  # first block larger than 64 KiB
    _expect_error(bytes(oversized), "block of 70000 bytes")
    for cut in (3, 9, 100, len(frame) // 2, len(frame) - 1):
        _expect_error(frame[:cut], "truncated")
    # A compressed block whose match points before the start of the output.
    bad_block = b"\x10a\xff\xff"
    garbled = frame[:7] + len(bad_block).to_bytes(4, "little") + bad_block + bytes(4)
    _expect_error(garbled, "corrupt LZ4-compressed body")
