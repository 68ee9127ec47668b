"""LTX encoder and decoder: the LiteFS fixture, round trips, rejections, corruption."""

from __future__ import annotations

import dataclasses
import io
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litefspy.errors import LTXChecksumError, LTXError
from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.encoder import Encoder, write_ltx_file
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    HEADER_SIZE,
    TRAILER_SIZE,
    Header,
    Trailer,
    lock_pgno,
)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
LITEFS_LTX = FIXTURES / "ltx" / "litefs-000000000000000d-000000000000000d.ltx"


def make_header(
    *, page_size: int = 512, commit: int = 8, snapshot: bool = True, compress: bool = False
) -> Header:
    return Header(
        flags=1 if compress else 0,
        page_size=page_size,
        commit=commit,
        min_txid=1 if snapshot else 4,
        max_txid=3 if snapshot else 4,
        timestamp=1_700_000_000_123,
        pre_apply_checksum=0 if snapshot else CHECKSUM_FLAG | 0xABCDEF,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=42,
    )


def page_data(pgno: int, page_size: int, seed: int = 0) -> bytes:
    # Half text-like, half random: compressible but not trivially.
    rnd = random.Random(pgno * 7919 + seed).randbytes(page_size // 2)
    text = (f"page {pgno} " * page_size).encode()[: page_size - len(rnd)]
    return text + rnd


def encode(
    header: Header, pages: list[tuple[int, bytes]], post: int | None = None
) -> tuple[bytes, Trailer]:
    if post is None:
        xor = 0
        for pgno, data in pages:
            xor ^= page_checksum(pgno, data)
        post = CHECKSUM_FLAG | xor
    buf = io.BytesIO()
    enc = Encoder(buf, header)
    for pgno, data in pages:
        enc.write_page(pgno, data)
    trailer = enc.finish(post)
    return buf.getvalue(), trailer


def decode(raw: bytes) -> tuple[Header, list[tuple[int, bytes]], Trailer]:
    dec = Decoder(io.BytesIO(raw))
    pages = list(dec.pages())
    return dec.header, pages, dec.trailer


def snapshot_pages(header: Header) -> list[tuple[int, bytes]]:
    lock = lock_pgno(header.page_size)
    return [(p, page_data(p, header.page_size)) for p in range(1, header.commit + 1) if p != lock]


# --- the LiteFS fixture ------------------------------------------------------------


def test_litefs_fixture_fields() -> None:
    with open(LITEFS_LTX, "rb") as f:
        header, pages, trailer = decode(f.read())
    assert header == Header(
        flags=0,
        page_size=4096,
        commit=10,
        min_txid=0xD,
        max_txid=0xD,
        timestamp=0,
        pre_apply_checksum=0x9C74A15B4E4F246C,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=0,
    )
    assert not header.is_snapshot and not header.compressed
    assert [pgno for pgno, _ in pages] == [1, 7, 8]
    assert pages[0][1].startswith(b"SQLite format 3\x00")
    assert trailer == Trailer(0xFE3831A381C602B9, 0x9496A29358326FB5)


def test_litefs_fixture_verifies() -> None:
    header, trailer = verify_file(LITEFS_LTX)
    assert header.max_txid == 0xD
    assert trailer.file_checksum == 0x9496A29358326FB5


def test_litefs_fixture_reencodes_byte_for_byte() -> None:
    original = LITEFS_LTX.read_bytes()
    header, pages, trailer = decode(original)
    raw, new_trailer = encode(header, pages, trailer.post_apply_checksum)
    assert new_trailer == trailer
    assert raw == original


def test_litefs_fixture_reencodes_compressed_and_back() -> None:
    header, pages, trailer = decode(LITEFS_LTX.read_bytes())
    packed = dataclasses.replace(header, flags=1)
    raw, new_trailer = encode(packed, pages, trailer.post_apply_checksum)
    # The file checksum covers the uncompressed form, so only the flag changes it.
    assert new_trailer.post_apply_checksum == trailer.post_apply_checksum
    assert len(raw) < len(LITEFS_LTX.read_bytes())
    header2, pages2, trailer2 = decode(raw)
    assert (header2, pages2, trailer2) == (packed, pages, new_trailer)


# --- round trips -------------------------------------------------------------------


@st.composite
def ltx_files(draw: st.DrawFn) -> tuple[Header, list[tuple[int, bytes]]]:
    page_size = draw(st.sampled_from([512 << i for i in range(8)]))
    snapshot = draw(st.booleans())
    max_pages = 6 if page_size <= 8192 else 3
    commit = draw(st.integers(0, max_pages))
    header = make_header(
        page_size=page_size,
        commit=commit,
        snapshot=snapshot,
        compress=draw(st.booleans()),
    )
    header = dataclasses.replace(
        header,
        timestamp=draw(st.integers(0, 1 << 62)),
        node_id=draw(st.integers(0, (1 << 64) - 1)),
    )
    seed = draw(st.integers(0, 1000))
    if snapshot:
        numbers = list(range(1, commit + 1))
    else:
        numbers = sorted(draw(st.sets(st.integers(1, max(commit, 1)), max_size=commit)))
    return header, [(p, page_data(p, page_size, seed)) for p in numbers]


@settings(max_examples=120, deadline=None)
@given(ltx_files())
def test_round_trip(case: tuple[Header, list[tuple[int, bytes]]]) -> None:
    header, pages = case
    raw, trailer = encode(header, pages)
    header2, pages2, trailer2 = decode(raw)
    assert header2 == header
    assert pages2 == pages
    assert trailer2 == trailer
    if not header.compressed:
        assert len(raw) == HEADER_SIZE + len(pages) * (4 + header.page_size) + 4 + TRAILER_SIZE


@settings(max_examples=60, deadline=None)
@given(ltx_files())
def test_pages_with_checksums_give_each_pages_checksum(
    case: tuple[Header, list[tuple[int, bytes]]],
) -> None:
    header, pages = case
    raw, trailer = encode(header, pages)
    dec = Decoder(io.BytesIO(raw))
    got = list(dec.pages_with_checksums())
    assert [(pgno, data) for pgno, data, _ in got] == pages
    assert [ck for _, _, ck in got] == [page_checksum(pgno, data) for pgno, data in pages]
    assert dec.trailer == trailer


def test_compressed_body_is_one_lz4_frame() -> None:
    import lz4.frame

    header = make_header(compress=True, commit=20)
    pages = snapshot_pages(header)
    raw, _ = encode(header, pages)
    body = lz4.frame.decompress(raw[HEADER_SIZE:-TRAILER_SIZE])
    expected = b"".join(struct.pack(">I", p) + d for p, d in pages) + bytes(4)
    assert body == expected


def test_write_ltx_file_is_durable_and_named(tmp_path: Path) -> None:
    header = make_header(commit=5)
    pages = snapshot_pages(header)
    path = tmp_path / "0000000000000001-0000000000000003.ltx"
    xor = 0
    for p, d in pages:
        xor ^= page_checksum(p, d)
    trailer = write_ltx_file(path, header, pages, CHECKSUM_FLAG | xor)
    assert verify_file(path) == (header, trailer)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_write_ltx_file_leaves_nothing_on_error(tmp_path: Path) -> None:
    header = make_header(commit=5)
    path = tmp_path / "x.ltx"
    with pytest.raises(LTXError, match="missing page"):
        write_ltx_file(path, header, snapshot_pages(header)[:2], CHECKSUM_FLAG)
    assert list(tmp_path.iterdir()) == []


# --- encoder rejections ------------------------------------------------------------


def fresh_encoder(**kw: object) -> Encoder:
    return Encoder(io.BytesIO(), make_header(**kw))  # type: ignore[arg-type]


@given(st.integers(1, 8), st.integers(0, 8))
def test_encoder_rejects_out_of_order(first: int, second: int) -> None:
    enc = fresh_encoder(snapshot=False, commit=8)
    enc.write_page(first, bytes(512))
    if second <= first:
        with pytest.raises(LTXError):
            enc.write_page(second, bytes(512))
    else:
        enc.write_page(second, bytes(512))


@given(st.integers(9, 1 << 32))
def test_encoder_rejects_pages_above_commit(pgno: int) -> None:
    enc = fresh_encoder(snapshot=False, commit=8)
    with pytest.raises(LTXError, match="above commit"):
        enc.write_page(pgno, bytes(512))


@given(st.integers(0, 70000).filter(lambda n: n != 4096))
def test_encoder_rejects_wrong_page_length(length: int) -> None:
    enc = fresh_encoder(snapshot=False, page_size=4096)
    with pytest.raises(LTXError, match="page size is 4096"):
        enc.write_page(1, bytes(length))


@given(st.integers(-5, 1 << 20).filter(lambda n: n < 512 or n > 65536 or n & (n - 1) != 0))
def test_encoder_rejects_bad_page_sizes(page_size: int) -> None:
    with pytest.raises(LTXError, match="page size"):
        fresh_encoder(page_size=page_size)


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_encoder_rejects_lock_page(page_size: int) -> None:
    lock = lock_pgno(page_size)
    enc = fresh_encoder(snapshot=False, page_size=page_size, commit=lock + 2)
    enc.write_page(lock - 1, bytes(page_size))
    with pytest.raises(LTXError, match="lock page"):
        enc.write_page(lock, bytes(page_size))
    enc.write_page(lock + 1, bytes(page_size))  # pages after it are fine


def test_encoder_rejects_incomplete_snapshot() -> None:
    enc = fresh_encoder(commit=3)
    enc.write_page(1, bytes(512))
    with pytest.raises(LTXError, match="missing page 2"):
        enc.write_page(3, bytes(512))
    enc = fresh_encoder(commit=3)
    enc.write_page(1, bytes(512))
    enc.write_page(2, bytes(512))
    with pytest.raises(LTXError, match="missing page 3"):
        enc.finish(CHECKSUM_FLAG | 1)


def test_encoder_rejects_bad_post_apply_and_reuse() -> None:
    enc = fresh_encoder(snapshot=False, commit=0)
    with pytest.raises(LTXError, match="commit 0"):
        enc.finish(CHECKSUM_FLAG | 1)
    enc = fresh_encoder(snapshot=False)
    with pytest.raises(LTXError, match="bit 63"):
        enc.finish(1)
    enc.finish(CHECKSUM_FLAG | 1)
    with pytest.raises(LTXError):
        enc.finish(CHECKSUM_FLAG | 1)
    with pytest.raises(LTXError):
        enc.write_page(1, bytes(512))


# --- decoder rejections of files the encoder refuses to write ---------------------


def handmade(header: Header, pgnos: list[int], compress: bool = False) -> bytes:
    """An LTX file with a correct file checksum but arbitrary page numbers."""
    import lz4.frame

    from litefspy.ltx.checksum import crc64

    body = b"".join(struct.pack(">I", p) + bytes(header.page_size) for p in pgnos) + bytes(4)
    raw_header = header.encode()
    post = CHECKSUM_FLAG | 1
    crc = crc64(post.to_bytes(8, "big"), crc64(body, crc64(raw_header)))
    stored = lz4.frame.compress(body) if compress else body
    return raw_header + stored + Trailer(post, CHECKSUM_FLAG | crc).encode()


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("pgnos", "snapshot", "commit", "message"),
    [
        ([2, 1], False, 8, "must ascend"),
        ([3, 3], False, 8, "must ascend"),
        ([9], False, 8, "above commit"),
        ([1, 3], True, 3, "missing page 2"),
        ([1, 2], True, 3, "missing page 3"),
        ([lock_pgno(512)], False, lock_pgno(512) + 1, "lock page"),
    ],
)
def test_decoder_rejects_layout_violations(
    pgnos: list[int], snapshot: bool, commit: int, message: str, compress: bool
) -> None:
    header = make_header(snapshot=snapshot, commit=commit, compress=compress)
    with pytest.raises(LTXError, match=message):
        decode(handmade(header, pgnos, compress))


def test_decoder_trailer_requires_pages_exhausted() -> None:
    raw, _ = encode(make_header(commit=2), snapshot_pages(make_header(commit=2)))
    dec = Decoder(io.BytesIO(raw))
    with pytest.raises(LTXError, match="not read yet"):
        _ = dec.trailer
    list(dec.pages())
    with pytest.raises(LTXError, match="only once"):
        list(dec.pages())


def test_verify_rejects_snapshot_with_wrong_post_apply(tmp_path: Path) -> None:
    header = make_header(commit=4)
    raw, _ = encode(header, snapshot_pages(header), post=CHECKSUM_FLAG | 12345)
    path = tmp_path / "snap.ltx"
    path.write_bytes(raw)
    decode(raw)  # the file itself is intact...
    with pytest.raises(LTXChecksumError, match=r"snap\.ltx: snapshot post-apply checksum"):
        verify_file(path)  # ...but it does not describe its own pages


# --- corruption --------------------------------------------------------------------

CORRUPTION_CASES = [
    pytest.param(False, True, id="snapshot-raw"),
    pytest.param(True, True, id="snapshot-lz4"),
    pytest.param(False, False, id="incremental-raw"),
    pytest.param(True, False, id="incremental-lz4"),
]


def sample_file(compress: bool, snapshot: bool) -> bytes:
    header = make_header(commit=12, snapshot=snapshot, compress=compress)
    pages = snapshot_pages(header) if snapshot else snapshot_pages(header)[2::3]
    raw, _ = encode(header, pages)
    return raw


@pytest.mark.parametrize(("compress", "snapshot"), CORRUPTION_CASES)
def test_every_single_bit_flip_is_detected(tmp_path: Path, compress: bool, snapshot: bool) -> None:
    raw = sample_file(compress, snapshot)
    path = tmp_path / "flipped.ltx"
    path.write_bytes(raw)
    verify_file(path)
    # One bit per byte (rotating), every byte: header, page data, frame, trailer.
    for pos in range(len(raw)):
        bad = bytearray(raw)
        bad[pos] ^= 1 << (pos % 8)
        path.write_bytes(bad)
        with pytest.raises(LTXError) as info:
            verify_file(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: "), msg
        assert "\n" not in msg


@pytest.mark.parametrize(("compress", "snapshot"), CORRUPTION_CASES)
def test_every_truncation_is_detected(tmp_path: Path, compress: bool, snapshot: bool) -> None:
    raw = sample_file(compress, snapshot)
    path = tmp_path / "short.ltx"
    for length in range(len(raw)):
        path.write_bytes(raw[:length])
        with pytest.raises(LTXError, match=r"short\.ltx: truncated"):
            verify_file(path)


@pytest.mark.parametrize(("compress", "snapshot"), CORRUPTION_CASES)
@pytest.mark.parametrize("extra", [b"\x00", b"garbage", bytes(5000)])
def test_trailing_garbage_is_detected(
    tmp_path: Path, compress: bool, snapshot: bool, extra: bytes
) -> None:
    path = tmp_path / "long.ltx"
    path.write_bytes(sample_file(compress, snapshot) + extra)
    with pytest.raises(LTXError, match="trailing garbage"):
        verify_file(path)


def test_bad_magic_and_checksum_messages(tmp_path: Path) -> None:
    raw = sample_file(False, True)
    path = tmp_path / "f.ltx"
    path.write_bytes(b"LTX0" + raw[4:])
    with pytest.raises(LTXError, match="bad magic"):
        verify_file(path)
    bad = bytearray(raw)
    bad[HEADER_SIZE + 10] ^= 0xFF
    path.write_bytes(bad)
    with pytest.raises(LTXChecksumError, match="file checksum mismatch"):
        verify_file(path)


def test_large_compressible_body_streams(tmp_path: Path) -> None:
    """Zero pages compress ~250:1; decoding must not need the whole body at once."""
    header = make_header(page_size=65536, commit=512, compress=True)  # 32 MiB of zeros
    pages = ((p, bytes(65536)) for p in range(1, 513))
    sums = PageChecksums(65536)
    sums.truncate(512)
    path = tmp_path / "zeros.ltx"
    write_ltx_file(path, header, pages, sums.total)
    assert path.stat().st_size < 1 << 20
    assert verify_file(path)[0] == header


class Dribble(io.RawIOBase):
    """A stream that returns at most a few bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self._src = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._src.read(min(len(b), self._step))
        b[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("step", [1, 7, 4099])
def test_decoder_handles_short_reads(compress: bool, step: int) -> None:
    header = make_header(page_size=1024, commit=9, compress=compress)
    pages = snapshot_pages(header)
    raw, trailer = encode(header, pages)
    dec = Decoder(Dribble(raw, step))  # type: ignore[arg-type]
    assert list(dec.pages()) == pages
    assert dec.trailer == trailer


def test_decoder_rejects_data_after_terminator_inside_lz4_frame() -> None:
    import lz4.frame

    from litefspy.ltx.checksum import crc64

    header = make_header(snapshot=False, commit=2, compress=True)
    body = struct.pack(">I", 1) + bytes(512) + bytes(4)
    raw_header = header.encode()
    post = CHECKSUM_FLAG | 1
    crc = crc64(post.to_bytes(8, "big"), crc64(body, crc64(raw_header)))
    stored = lz4.frame.compress(body + b"extra")
    raw = raw_header + stored + Trailer(post, CHECKSUM_FLAG | crc).encode()
    with pytest.raises(LTXError, match="after the page-block terminator"):
        decode(raw)
