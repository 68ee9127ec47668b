"""Database header parsing against files written by real SQLite."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest

from litefspy.errors import SQLiteFormatError
from litefspy.sqlite.header import (
    HEADER_SIZE,
    SQLITE_MAGIC,
    is_valid_page_size,
    lock_page,
    parse_database_header,
)


def make_db(path: Path, page_size: int, journal_mode: str = "delete", rows: int = 3) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute("CREATE TABLE t(v)")
    for _ in range(rows):
        conn.execute("INSERT INTO t VALUES (randomblob(2000))")
    conn.close()


@pytest.mark.parametrize("page_size", [512, 1024, 4096, 32768, 65536])
def test_real_database_header(tmp_path: Path, page_size: int) -> None:
    db = tmp_path / "a.db"
    make_db(db, page_size)
    raw = db.read_bytes()
    header = parse_database_header(raw[:HEADER_SIZE])
    assert header.page_size == page_size
    assert (header.write_version, header.read_version) == (1, 1)
    assert not header.is_wal
    assert header.page_count_valid
    assert header.page_count == len(raw) // page_size
    # Each of the 4 transactions (create, 3 inserts) bumps the change counter.
    assert header.change_counter == 4
    assert header.sqlite_version == sqlite3.sqlite_version_info[0] * 1_000_000 + (
        sqlite3.sqlite_version_info[1] * 1000 + sqlite3.sqlite_version_info[2]
    )
    if page_size == 65536:
        assert raw[16:18] == b"\x00\x01"  # stored as 1


def test_wal_database_header(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    make_db(db, 4096, "wal")
    header = parse_database_header(db.read_bytes())
    assert header.is_wal
    assert (header.write_version, header.read_version) == (2, 2)


def test_page_count_not_trusted_when_stale() -> None:
    raw = bytearray(SQLITE_MAGIC + bytes(HEADER_SIZE - 16))
    struct.pack_into(">H", raw, 16, 4096)
    struct.pack_into(">I", raw, 24, 7)  # change counter
    struct.pack_into(">I", raw, 28, 3)  # page count
    struct.pack_into(">I", raw, 92, 6)  # written by a version that did not keep it
    assert not parse_database_header(bytes(raw)).page_count_valid
    struct.pack_into(">I", raw, 92, 7)
    assert parse_database_header(bytes(raw)).page_count_valid
    struct.pack_into(">I", raw, 28, 0)
    assert not parse_database_header(bytes(raw)).page_count_valid


def test_header_errors(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    make_db(db, 4096)
    raw = db.read_bytes()[:HEADER_SIZE]
    with pytest.raises(SQLiteFormatError, match="too short"):
        parse_database_header(raw[:99])
    with pytest.raises(SQLiteFormatError, match="not a SQLite database"):
        parse_database_header(b"SQLite format 2\x00" + raw[16:])
    with pytest.raises(SQLiteFormatError, match="not a SQLite database"):
        parse_database_header(bytes(HEADER_SIZE))
    for bad in (0, 256, 1000, 4097, 2):
        mutated = raw[:16] + struct.pack(">H", bad) + raw[18:]
        with pytest.raises(SQLiteFormatError, match=f"invalid page size {bad}"):
            parse_database_header(mutated)


def test_accepts_longer_buffers_and_memoryview(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    make_db(db, 1024)
    raw = db.read_bytes()
    assert parse_database_header(memoryview(raw)) == parse_database_header(raw[:HEADER_SIZE])


def test_page_size_helpers() -> None:
    assert [p for p in range(256, 70000) if is_valid_page_size(p)] == [
        512,
        1024,
        2048,
        4096,
        8192,
        16384,
        32768,
        65536,
    ]
    assert lock_page(4096) == 262145
    assert lock_page(512) == 2097153
