"""LTX header/trailer layout and validation, file names and positions."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from litefspy.errors import LTXError
from litefspy.ltx.format import (
    CHECKSUM_FLAG,
    HEADER_SIZE,
    MAGIC,
    Header,
    Trailer,
    format_filename,
    format_pos,
    lock_pgno,
    parse_filename,
    parse_pos,
)
from litefspy.sqlite.header import PENDING_BYTE

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
I64 = (1 << 63) - 1


def incremental(**changes: int) -> Header:
    base = Header(
        flags=0,
        page_size=4096,
        commit=10,
        min_txid=5,
        max_txid=5,
        timestamp=1_700_000_000_000,
        pre_apply_checksum=CHECKSUM_FLAG | 0x1234,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=7,
    )
    return dataclasses.replace(base, **changes)


def test_lock_pgno_matches_pending_byte() -> None:
    assert lock_pgno(4096) == 262145
    assert lock_pgno(512) == PENDING_BYTE // 512 + 1
    assert lock_pgno(65536) == 16385


def test_header_layout_is_big_endian_in_file_order() -> None:
    h = incremental(
        flags=1,
        wal_offset=32,
        wal_size=4120,
        wal_salt1=0xAABBCCDD,
        wal_salt2=0x11223344,
        node_id=0x0102030405060708,
    )
    raw = h.encode()
    assert len(raw) == HEADER_SIZE
    assert raw[:4] == MAGIC
    assert struct.unpack(">III", raw[4:16]) == (1, 4096, 10)
    assert struct.unpack(">QQq", raw[16:40]) == (5, 5, 1_700_000_000_000)
    assert struct.unpack(">Q", raw[40:48]) == (CHECKSUM_FLAG | 0x1234,)
    assert struct.unpack(">qqII", raw[48:72]) == (32, 4120, 0xAABBCCDD, 0x11223344)
    assert struct.unpack(">Q", raw[72:80]) == (0x0102030405060708,)
    assert raw[80:] == bytes(20)
    assert Header.decode(raw) == h


def test_snapshot_and_compressed_properties() -> None:
    snap = incremental(min_txid=1, max_txid=3, pre_apply_checksum=0, flags=1)
    assert snap.is_snapshot and snap.compressed
    assert not incremental().is_snapshot and not incremental().compressed


BROKEN_HEADERS = [
    (dict(flags=2), "flags"),
    (dict(flags=0x80000001), "flags"),
    (dict(page_size=0), "page size"),
    (dict(page_size=256), "page size"),
    (dict(page_size=131072), "page size"),
    (dict(page_size=3000), "page size"),
    (dict(commit=-1), "commit"),
    (dict(commit=U32 + 1), "commit"),
    (dict(min_txid=0, max_txid=0), "min TXID"),
    (dict(min_txid=6, max_txid=5), "max TXID"),
    (dict(max_txid=U64 + 1), "max TXID"),
    (dict(timestamp=I64 + 1), "timestamp"),
    (dict(pre_apply_checksum=0), "pre-apply"),
    (dict(pre_apply_checksum=0x1234), "pre-apply"),
    (dict(min_txid=1, pre_apply_checksum=CHECKSUM_FLAG | 1), "pre-apply"),
    (dict(wal_offset=-1, wal_size=-1), "WAL offset"),
    (dict(wal_offset=32, wal_size=0), "WAL offset"),
    (dict(wal_offset=0, wal_size=4120), "WAL offset"),
    (dict(wal_offset=32, wal_size=-5), "WAL size"),
    (dict(wal_salt1=1), "salt"),
    (dict(wal_salt2=1), "salt"),
    (dict(wal_offset=32, wal_size=4120, wal_salt1=U32 + 1), "salt-1"),
    (dict(node_id=-1), "node ID"),
]


@pytest.mark.parametrize(("changes", "field"), BROKEN_HEADERS)
def test_header_validation_rejects_each_broken_rule(changes: dict[str, int], field: str) -> None:
    bad = incremental(**changes)
    with pytest.raises(LTXError, match=field):
        bad.validate()
    with pytest.raises(LTXError):
        bad.encode()


def test_valid_header_variants_pass() -> None:
    incremental().validate()
    incremental(min_txid=1, max_txid=1, pre_apply_checksum=0).validate()
    incremental(wal_offset=32, wal_size=4120, wal_salt1=1, wal_salt2=2).validate()
    incremental(commit=0).validate()


def test_decode_rejects_bad_magic_reserved_and_short_input() -> None:
    raw = incremental().encode()
    with pytest.raises(LTXError, match="magic"):
        Header.decode(b"LTX2" + raw[4:])
    with pytest.raises(LTXError, match="reserved"):
        Header.decode(raw[:99] + b"\x01")
    with pytest.raises(LTXError, match="truncated"):
        Header.decode(raw[:50])
    # Decoding validates: a rule broken on disk is caught too.
    with pytest.raises(LTXError, match="page size"):
        Header.decode(raw[:8] + struct.pack(">I", 1000) + raw[12:])


page_sizes = st.sampled_from([512 << i for i in range(8)])


@st.composite
def headers(draw: st.DrawFn) -> Header:
    snapshot = draw(st.booleans())
    min_txid = 1 if snapshot else draw(st.integers(2, U64))
    wal = draw(st.booleans())
    return Header(
        flags=draw(st.sampled_from([0, 1])),
        page_size=draw(page_sizes),
        commit=draw(st.integers(0, U32)),
        min_txid=min_txid,
        max_txid=draw(st.integers(min_txid, U64)),
        timestamp=draw(st.integers(-(1 << 63), I64)),
        pre_apply_checksum=0 if snapshot else CHECKSUM_FLAG | draw(st.integers(0, I64)),
        wal_offset=draw(st.integers(1, I64)) if wal else 0,
        wal_size=draw(st.integers(1, I64)) if wal else 0,
        wal_salt1=draw(st.integers(0, U32)) if wal else 0,
        wal_salt2=draw(st.integers(0, U32)) if wal else 0,
        node_id=draw(st.integers(0, U64)),
    )


@given(headers())
def test_header_round_trips(h: Header) -> None:
    raw = h.encode()
    assert len(raw) == HEADER_SIZE
    assert Header.decode(raw) == h


def test_trailer_round_trip_and_rules() -> None:
    t = Trailer(CHECKSUM_FLAG | 5, CHECKSUM_FLAG | 9)
    assert Trailer.decode(t.encode()) == t
    t.validate(commit=3)
    with pytest.raises(LTXError, match="post-apply"):
        Trailer(5, CHECKSUM_FLAG).validate()
    with pytest.raises(LTXError, match="commit 0"):
        Trailer(CHECKSUM_FLAG | 5, CHECKSUM_FLAG).validate(commit=0)
    Trailer(CHECKSUM_FLAG, CHECKSUM_FLAG | 1).validate(commit=0)
    with pytest.raises(LTXError, match="file checksum"):
        Trailer(CHECKSUM_FLAG, 1).validate()
    with pytest.raises(LTXError, match="truncated"):
        Trailer.decode(b"\x00" * 15)


def test_filenames() -> None:
    assert format_filename(1, 0xD) == "0000000000000001-000000000000000d.ltx"
    assert parse_filename("0000000000000001-000000000000000d.ltx") == (1, 13)
    assert parse_filename("/data/dbs/x/ltx/000000000000000a-000000000000000b.ltx") == (10, 11)
    for bad in [
        "litefs-000000000000000d-000000000000000d.ltx",
        "0000000000000001-000000000000000D.ltx",
        "1-2.ltx",
        "0000000000000001-000000000000000d.ltx.tmp",
        "0000000000000002-0000000000000001.ltx",
        "0000000000000000-0000000000000001.ltx",
    ]:
        with pytest.raises(LTXError):
            parse_filename(bad)


@given(st.integers(1, U64), st.integers(0, U64))
def test_filename_and_pos_round_trip(a: int, b: int) -> None:
    lo, hi = min(a, max(b, 1)), max(a, b)
    assert parse_filename(format_filename(lo, hi)) == (lo, hi)
    assert parse_pos(format_pos(a, b)) == (a, b)
    assert parse_pos(format_pos(a, b) + "\n") == (a, b)


def test_positions() -> None:
    assert format_pos(13, 0xFE3831A381C602B9) == "000000000000000d/fe3831a381c602b9"
    for bad in ["", "d/fe3831a381c602b9", "000000000000000d-fe3831a381c602b9", "x" * 33]:
        with pytest.raises(LTXError):
            parse_pos(bad)
