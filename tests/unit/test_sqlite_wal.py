"""WAL parsing: fixtures, WALs written by real SQLite, checksum against a plain reference."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litefspy.errors import SQLiteFormatError
from litefspy.sqlite.wal import (
    WAL_FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    WALReader,
    WALTransaction,
    encode_frame,
    encode_wal_header,
    frame_checksum,
    parse_frame_header,
    parse_wal_header,
    wal_checksum,
)

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "wal"
U32 = 0xFFFFFFFF


def reference_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """The checksum exactly as FORMATS.md words it, one pair at a time."""
    order: Literal["big", "little"] = "big" if big_endian else "little"
    for i in range(0, len(data), 8):
        x0 = int.from_bytes(data[i : i + 4], order)
        x1 = int.from_bytes(data[i + 4 : i + 8], order)
        s0 = (s0 + x0 + s1) & U32
        s1 = (s1 + x1 + s0) & U32
    return s0, s1


def read_fixture(name: str) -> WALReader:
    return WALReader(io.BytesIO((FIXTURES / name).read_bytes()))


# --------------------------------------------------------------------------- checksum


@settings(max_examples=300, deadline=None)
@given(
    data=st.integers(min_value=0, max_value=1200).flatmap(
        lambda pairs: st.binary(min_size=8 * pairs, max_size=8 * pairs)
    ),
    s0=st.integers(min_value=0, max_value=U32),
    s1=st.integers(min_value=0, max_value=U32),
    big_endian=st.booleans(),
)
def test_checksum_matches_reference(data: bytes, s0: int, s1: int, big_endian: bool) -> None:
    expected = reference_checksum(data, s0, s1, big_endian)
    assert wal_checksum(data, s0, s1, big_endian) == expected
    assert wal_checksum(memoryview(bytearray(data)), s0, s1, big_endian) == expected


@pytest.mark.parametrize("size", [512, 4096, 65536])
@pytest.mark.parametrize("big_endian", [False, True])
def test_checksum_of_page_sizes(size: int, big_endian: bool) -> None:
    for fill in (b"\xff", b"\x00", os.urandom(1)):
        page = os.urandom(size) if fill == b"\x00" else fill * size
        seed = (0xDEADBEEF, 0xFEEDFACE)
        expected = reference_checksum(page, *seed, big_endian)
        assert wal_checksum(page, *seed, big_endian) == expected


def test_checksum_is_cumulative() -> None:
    # Splitting the input anywhere on a pair boundary gives the same result.
    data = os.urandom(8 * 300)
    whole = wal_checksum(data, 1, 2, False)
    for cut in (8, 64, 8 * 17, 8 * 150, 8 * 299):
        part = wal_checksum(data[:cut], 1, 2, False)
        assert wal_checksum(data[cut:], *part, False) == whole


def test_checksum_rejects_partial_pairs() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        wal_checksum(b"\x00" * 12, 0, 0, False)


# --------------------------------------------------------------------------- fixtures


def test_fixture_ok_has_three_valid_frames() -> None:
    reader = read_fixture("wal-ok.wal")
    assert reader.header.magic == WAL_MAGIC_LE
    assert reader.header.page_size == 4096
    assert not reader.header.big_endian_checksums
    frames = list(reader.frames())
    assert [f.offset for f in frames] == [32, 32 + 4120, 32 + 2 * 4120]
    assert [f.header.pgno for f in frames] == [1, 2, 2]
    assert [f.header.commit for f in frames] == [0, 2, 2]
    assert all(len(f.data) == 4096 for f in frames)
    txns = list(reader.transactions())
    assert [(t.start_offset, t.end_offset, t.commit, t.frame_count) for t in txns] == [
        (32, 8272, 2, 2),
        (8272, 12392, 2, 1),
    ]
    assert txns[0].pages == {1: 56, 2: 4176}
    assert txns[1].pages == {2: 8296}
    assert txns[1].checksum == (frames[2].header.checksum1, frames[2].header.checksum2)


def test_fixture_chain_by_hand() -> None:
    raw = (FIXTURES / "wal-ok.wal").read_bytes()
    header = parse_wal_header(raw[:WAL_HEADER_SIZE])
    chain = (header.checksum1, header.checksum2)
    for i in range(3):
        start = WAL_HEADER_SIZE + i * 4120
        fh = parse_frame_header(raw[start : start + WAL_FRAME_HEADER_SIZE])
        head, page = raw[start : start + 8], raw[start + 24 : start + 4120]
        expected = reference_checksum(head + page, *chain, False)
        chain = frame_checksum(head, page, *chain, big_endian=False)
        assert chain == expected == (fh.checksum1, fh.checksum2)


@pytest.mark.parametrize("name", ["wal-salt-mismatch.wal", "wal-frame-checksum-mismatch.wal"])
def test_fixture_invalid_second_frame_stops_reading(name: str) -> None:
    reader = read_fixture(name)
    frames = list(reader.frames())
    assert [f.offset for f in frames] == [32]
    # Frame 1 alone is not committed, so there is no transaction at all.
    assert list(reader.transactions()) == []


# --------------------------------------------------------------------------- headers


def test_header_round_trip_both_endiannesses() -> None:
    for big_endian in (False, True):
        raw = encode_wal_header(
            1024, 0x11223344, 0x55667788, checkpoint_seq=7, big_endian=big_endian
        )
        header = parse_wal_header(raw)
        assert header.magic == (WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE)
        assert header.big_endian_checksums is big_endian
        assert (header.page_size, header.checkpoint_seq) == (1024, 7)
        assert (header.salt1, header.salt2) == (0x11223344, 0x55667788)
        assert (header.checksum1, header.checksum2) == reference_checksum(
            raw[:24], 0, 0, big_endian
        )


def _with_u32(raw: bytes, offset: int, value: int) -> bytes:
    return raw[:offset] + struct.pack(">I", value) + raw[offset + 4 :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw[:31], "too short"),
        (lambda raw: _with_u32(raw, 0, 0x377F0684), "bad magic"),
        (lambda raw: b"SQLite format 3\x00" + raw[16:], "bad magic"),
        (lambda raw: _with_u32(raw, 4, 3007001), "unsupported WAL format version 3007001"),
        (lambda raw: _with_u32(raw, 8, 1000), "invalid page size 1000"),
        (lambda raw: _with_u32(raw, 8, 256), "invalid page size 256"),
        (lambda raw: _with_u32(raw, 8, 131072), "invalid page size 131072"),
        (lambda raw: _with_u32(raw, 16, 0x99), "checksum mismatch"),
        (lambda raw: _with_u32(raw, 28, 0), "checksum mismatch"),
    ],
)
def test_header_errors(mutate: Callable[[bytes], bytes], message: str) -> None:
    raw = encode_wal_header(4096, 1, 2)
    with pytest.raises(SQLiteFormatError, match=message):
        parse_wal_header(mutate(raw))


def test_reader_rejects_empty_file() -> None:
    with pytest.raises(SQLiteFormatError, match="too short"):
        WALReader(io.BytesIO(b""))


def test_frame_header_too_short() -> None:
    with pytest.raises(SQLiteFormatError, match="too short"):
        parse_frame_header(b"\x00" * 23)


# --------------------------------------------------------------------------- synthetic WALs


def build_wal(
    page_size: int, txns: list[list[tuple[int, bytes]]], *, big_endian: bool = False
) -> bytes:
    """A WAL with the given transactions; each one's last frame commits (size = max pgno)."""
    raw = encode_wal_header(page_size, 0xA1B2C3D4, 0x01020304, big_endian=big_endian)
    header = parse_wal_header(raw)
    chain = (header.checksum1, header.checksum2)
    out = [raw]
    size = 0
    for txn in txns:
        for i, (pgno, page) in enumerate(txn):
            size = max(size, pgno)
            frame, chain = encode_frame(header, pgno, size if i == len(txn) - 1 else 0, page, chain)
            out.append(frame)
    return b"".join(out)


@settings(max_examples=40, deadline=None)
@given(
    page_size=st.sampled_from([512, 1024, 4096]),
    big_endian=st.booleans(),
    shape=st.lists(st.lists(st.integers(1, 20), min_size=1, max_size=5), min_size=1, max_size=5),
)
def test_synthetic_wal_round_trip(page_size: int, big_endian: bool, shape: list[list[int]]) -> None:
    txns = [[(pgno, os.urandom(page_size)) for pgno in txn] for txn in shape]
    raw = build_wal(page_size, txns, big_endian=big_endian)
    reader = WALReader(io.BytesIO(raw))
    got = list(reader.transactions())
    assert len(got) == len(txns)
    for txn, frames in zip(got, txns, strict=True):
        assert txn.frame_count == len(frames)
        last = {pgno: page for pgno, page in frames}
        assert set(txn.pages) == set(last)
        for pgno, offset in txn.pages.items():
            assert raw[offset : offset + page_size] == last[pgno]


def test_uncommitted_tail_and_torn_frames_are_ignored() -> None:
    page = bytes(range(256)) * 2
    raw = build_wal(512, [[(1, page)], [(2, page), (3, page)]])
    frame = WAL_FRAME_HEADER_SIZE + 512
    assert len(list(WALReader(io.BytesIO(raw)).transactions())) == 2
    # The commit frame half written: only the first transaction remains.
    torn = raw[: len(raw) - 100]
    reader = WALReader(io.BytesIO(torn))
    assert [t.commit for t in reader.transactions()] == [1]
    assert len(list(reader.frames())) == 2  # frame 2 is valid, but not committed
    # A flipped bit in a page breaks the chain from that frame on.
    flipped = bytearray(raw)
    flipped[WAL_HEADER_SIZE + frame + 30] ^= 1
    reader = WALReader(io.BytesIO(bytes(flipped)))
    assert len(list(reader.frames())) == 1
    # A frame for page 0 is never valid.
    header = parse_wal_header(raw[:WAL_HEADER_SIZE])
    zero, _ = encode_frame(header, 0, 1, page, (header.checksum1, header.checksum2))
    assert list(WALReader(io.BytesIO(raw[:WAL_HEADER_SIZE] + zero)).frames()) == []


def test_resume_from_a_known_position() -> None:
    page = b"\x07" * 1024
    raw = build_wal(1024, [[(1, page)], [(2, page)], [(3, page), (1, page)]])
    reader = WALReader(io.BytesIO(raw))
    all_txns = list(reader.transactions())
    resumed = list(reader.transactions(start=all_txns[0].end_offset, chain=all_txns[0].checksum))
    assert resumed == all_txns[1:]
    with pytest.raises(ValueError, match="frame boundary"):
        list(reader.frames(start=WAL_HEADER_SIZE + 1))


# --------------------------------------------------------------------------- real SQLite


def wal_connection(path: Path, page_size: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def materialize(base: bytes, wal: bytes, txns: list[WALTransaction], page_size: int) -> bytes:
    """The database after applying transactions' pages on top of `base`."""
    db = bytearray(base)
    for txn in txns:
        for pgno, offset in txn.pages.items():
            start = (pgno - 1) * page_size
            if len(db) < start:
                db.extend(bytes(start - len(db)))
            db[start : start + page_size] = wal[offset : offset + page_size]
        del db[txn.commit * page_size :]
    return bytes(db)


def row_count(tmp_path: Path, image: bytes) -> int:
    path = tmp_path / "image.db"
    path.write_bytes(image)
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        (count,) = conn.execute("SELECT count(*) FROM t").fetchone()
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    return int(count)


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_real_sqlite_wal_transactions(tmp_path: Path, page_size: int) -> None:
    db = tmp_path / "app.db"
    conn = wal_connection(db, page_size)
    conn.execute("PRAGMA cache_size=20")  # small enough that big transactions spill
    base = db.read_bytes()
    committed: list[tuple[int, int]] = []  # (page count, rows) after each commit
    rows = 0

    def commit_point() -> None:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        committed.append((pages, rows))

    for i in range(5):
        conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(100 + 1500 * i),))
        rows += 1
        commit_point()
    conn.execute("BEGIN")
    for _ in range(200):
        conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(700),))
    conn.execute("COMMIT")
    rows += 200
    commit_point()
    conn.execute("BEGIN")
    conn.execute("UPDATE t SET v = randomblob(length(v))")  # rewrites spilled pages
    conn.execute("COMMIT")
    commit_point()
    conn.execute("DELETE FROM t WHERE id % 2 = 0")
    rows -= 102
    commit_point()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t(v) VALUES (x'00')")
    conn.execute("ROLLBACK")  # leaves no committed transaction behind
    conn.execute("VACUUM")  # shrinks the database: commit < previous size
    commit_point()

    wal = (tmp_path / "app.db-wal").read_bytes()
    reader = WALReader(io.BytesIO(wal))
    assert reader.header.page_size == page_size
    txns = list(reader.transactions())
    assert [t.commit for t in txns] == [pages for pages, _ in committed]
    assert committed[-1][0] < committed[-2][0]
    for i, (_, expected_rows) in enumerate(committed):
        image = materialize(base, wal, txns[: i + 1], page_size)
        assert len(image) == committed[i][0] * page_size
        assert row_count(tmp_path, image) == expected_rows

    # Frames are contiguous and account for the whole (committed) WAL.
    assert txns[0].start_offset == WAL_HEADER_SIZE
    for before, after in itertools.pairwise(txns):
        assert before.end_offset == after.start_offset
    assert txns[-1].end_offset == len(wal)

    # SQLite's own checkpoint produces exactly the database the reader describes.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert db.read_bytes() == materialize(base, wal, txns, page_size)


def test_real_sqlite_wal_restart_ignores_old_frames(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = wal_connection(db, 4096)
    for _ in range(10):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    old = WALReader(io.BytesIO((tmp_path / "app.db-wal").read_bytes()))
    assert len(list(old.transactions())) == 10
    assert conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
    conn.execute("INSERT INTO t(v) VALUES (1)")  # restarts the log from the beginning
    raw = (tmp_path / "app.db-wal").read_bytes()
    reader = WALReader(io.BytesIO(raw))
    assert (reader.header.salt1, reader.header.salt2) != (old.header.salt1, old.header.salt2)
    assert reader.header.checkpoint_seq == old.header.checkpoint_seq + 1
    txns = list(reader.transactions())
    assert len(txns) == 1
    assert txns[0].end_offset < len(raw)  # stale frames of the old generation follow
    conn.close()


def test_real_sqlite_wal_copy_of_torn_commit(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = wal_connection(db, 1024)
    conn.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    conn.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
    wal = tmp_path / "app.db-wal"
    copy = tmp_path / "copy.wal"
    shutil.copyfile(wal, copy)
    conn.close()
    raw = copy.read_bytes()
    full = list(WALReader(io.BytesIO(raw)).transactions())
    assert len(full) == 2
    # SQLite writes a frame header, then its page: cut inside the commit frame's page.
    cut = full[1].end_offset - 10
    assert [t.commit for t in WALReader(io.BytesIO(raw[:cut])).transactions()] == [full[0].commit]
