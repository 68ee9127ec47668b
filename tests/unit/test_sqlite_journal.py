"""Rollback journals: hot journals made by killing a real SQLite writer mid-transaction.

Each test compares litefspy's rollback with the database as it was before the
transaction, and with what SQLite itself does when it opens the same hot
journal (a copy of the files in another directory).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from litefspy.sqlite.journal import (
    JOURNAL_HEADER_SIZE,
    JOURNAL_MAGIC,
    UNTIL_END_OF_FILE,
    is_hot_journal,
    iter_journal_records,
    journal_record_checksum,
    parse_journal_header,
    rollback_journal,
)

# Runs the transaction in its own process, which the test kills with SIGKILL
# before COMMIT. cache_size is tiny so SQLite must spill changed pages into the
# database file (after journaling the originals) before the commit.
WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    db, mode, sync = sys.argv[1:4]
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("PRAGMA cache_size=10")
    conn.execute("BEGIN")
    conn.execute("UPDATE t SET v = randomblob(length(v))")
    conn.execute("INSERT INTO t(v) SELECT randomblob(900) FROM t LIMIT 50")
    conn.execute("UPDATE t SET v = randomblob(10) WHERE id % 3 = 0")
    print("ready", flush=True)
    time.sleep(60)
    """
)


@dataclass
class HotJournal:
    db: Path
    journal: Path
    before: bytes  # the database before the killed transaction
    hot_db: bytes  # the database as the killed writer left it


def make_hot_journal(
    tmp_path: Path, mode: str, sync: str = "full", page_size: int = 4096, row_size: int = 500
) -> HotJournal:
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    for _ in range(300):  # separate transactions: PERSIST leaves old records behind
        conn.execute("INSERT INTO t(v) VALUES (randomblob(?))", (row_size,))
    conn.close()
    before = db.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), mode, sync], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    journal = tmp_path / "app.db-journal"
    hot_db = db.read_bytes()
    assert hot_db != before, "the writer did not spill into the database: the test proves nothing"
    return HotJournal(db, journal, before, hot_db)


def sqlite_rollback(tmp_path: Path, db_bytes: bytes, journal_bytes: bytes) -> bytes:
    """What SQLite makes of the same hot journal when it next opens the database."""
    where = tmp_path / "sqlite-oracle"
    where.mkdir(exist_ok=True)
    (where / "app.db").write_bytes(db_bytes)
    (where / "app.db-journal").write_bytes(journal_bytes)
    conn = sqlite3.connect(where / "app.db")
    try:
        conn.execute("SELECT count(*) FROM t").fetchone()
    finally:
        conn.close()
    assert not (where / "app.db-journal").exists() or (
        (where / "app.db-journal").read_bytes()[:8] != JOURNAL_MAGIC
    )
    return (where / "app.db").read_bytes()


def integrity_ok(db: Path) -> bool:
    conn = sqlite3.connect(db)
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchone() == ("ok",))
    finally:
        conn.close()


# --------------------------------------------------------------------------- real hot journals


@pytest.mark.parametrize("sync", ["full", "off"])
@pytest.mark.parametrize("mode", ["delete", "persist", "truncate"])
def test_rollback_restores_pre_transaction_bytes(tmp_path: Path, mode: str, sync: str) -> None:
    hot = make_hot_journal(tmp_path, mode, sync)
    journal_bytes = hot.journal.read_bytes()
    assert is_hot_journal(hot.journal, hot.db)
    header = parse_journal_header(journal_bytes)
    assert header is not None
    assert header.page_size == 4096
    assert header.initial_page_count == len(hot.before) // 4096
    with open(hot.journal, "rb") as f:
        segments = {r.segment_offset for r in iter_journal_records(f)}
    if sync == "off":
        # Never synced, so the count was never filled in; one segment to the end.
        assert header.record_count == UNTIL_END_OF_FILE
        assert segments == {0}
    else:
        # Every cache spill synced the journal and started a new segment.
        assert len(segments) > 1

    restored = rollback_journal(hot.journal, hot.db)
    assert restored > 0
    hot.journal.unlink()
    assert hot.db.read_bytes() == hot.before
    assert hot.db.read_bytes() == sqlite_rollback(tmp_path, hot.hot_db, journal_bytes)
    assert integrity_ok(hot.db)


@pytest.mark.parametrize("page_size", [512, 65536])
def test_rollback_other_page_sizes(tmp_path: Path, page_size: int) -> None:
    # Big enough rows that the database outgrows the 10-page cache.
    hot = make_hot_journal(tmp_path, "delete", "full", page_size, row_size=page_size // 10)
    assert rollback_journal(hot.journal, hot.db) > 0
    assert hot.db.read_bytes() == hot.before


def _last_overwritten_record(hot: HotJournal) -> tuple[int, int, int]:
    """(offset, pgno, page size) of the last record whose page the writer had already
    overwritten in the database, and which is the only record of its page."""
    with open(hot.journal, "rb") as f:
        records = list(iter_journal_records(f))
    header = parse_journal_header(hot.journal.read_bytes())
    assert header is not None
    size = header.page_size
    pgnos = [r.pgno for r in records]
    for record in reversed(records):
        start = (record.pgno - 1) * size
        if pgnos.count(record.pgno) == 1 and hot.hot_db[start : start + size] != record.data:
            return record.offset, record.pgno, size
    raise AssertionError("no record of an overwritten page")


@pytest.mark.parametrize("damage", ["truncate", "checksum", "pgno-zero"])
def test_torn_record_stops_playback(tmp_path: Path, damage: str) -> None:
    hot = make_hot_journal(tmp_path, "delete", "off")
    offset, pgno, page_size = _last_overwritten_record(hot)
    raw = bytearray(hot.journal.read_bytes())
    if damage == "truncate":
        del raw[offset + 4 + page_size // 2 :]  # the page was half written
    elif damage == "checksum":
        raw[offset + 4 + page_size - 200] ^= 0xFF  # a sampled byte differs
    else:
        struct.pack_into(">I", raw, offset, 0)
    hot.journal.write_bytes(bytes(raw))
    with open(hot.journal, "rb") as f:
        assert all(r.offset < offset for r in iter_journal_records(f))

    assert rollback_journal(hot.journal, hot.db) > 0
    after = hot.db.read_bytes()
    assert after == sqlite_rollback(tmp_path, hot.hot_db, bytes(raw))
    # The damaged record was not played back: its page keeps the writer's version.
    start = (pgno - 1) * page_size
    assert after[start : start + page_size] == hot.hot_db[start : start + page_size]
    assert after != hot.before
    assert len(after) == len(hot.before)


def test_damaged_later_segment_header_stops_playback(tmp_path: Path) -> None:
    hot = make_hot_journal(tmp_path, "delete", "full")
    with open(hot.journal, "rb") as f:
        segments = sorted({r.segment_offset for r in iter_journal_records(f)})
    raw = bytearray(hot.journal.read_bytes())
    raw[segments[-1] : segments[-1] + 8] = bytes(8)
    hot.journal.write_bytes(bytes(raw))
    with open(hot.journal, "rb") as f:
        assert {r.segment_offset for r in iter_journal_records(f)} == set(segments[:-1])
    rollback_journal(hot.journal, hot.db)
    assert hot.db.read_bytes() == sqlite_rollback(tmp_path, hot.hot_db, bytes(raw))


def test_zeroed_persist_journal_is_not_hot(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=persist")
    conn.execute("CREATE TABLE t(v)")
    conn.execute("INSERT INTO t VALUES (randomblob(5000))")
    conn.close()
    journal = tmp_path / "app.db-journal"
    raw = journal.read_bytes()
    assert len(raw) > JOURNAL_HEADER_SIZE  # the records of the committed txn are still there
    assert raw[:JOURNAL_HEADER_SIZE] == bytes(JOURNAL_HEADER_SIZE)
    assert parse_journal_header(raw) is None
    assert not is_hot_journal(journal, db)
    before = db.read_bytes()
    assert rollback_journal(journal, db) == 0
    assert db.read_bytes() == before


def test_is_hot_journal_edge_cases(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    journal = tmp_path / "app.db-journal"
    assert not is_hot_journal(journal, db)
    db.write_bytes(b"")
    assert not is_hot_journal(journal, db)
    journal.write_bytes(b"")  # TRUNCATE mode after commit
    assert not is_hot_journal(journal, db)
    journal.write_bytes(JOURNAL_MAGIC + bytes(20))
    assert is_hot_journal(journal, db)
    db.unlink()
    assert not is_hot_journal(journal, db)  # nothing to roll back into


# --------------------------------------------------------------------------- synthetic journals


def _journal(
    page_size: int,
    initial_pages: int,
    records: list[tuple[int, bytes]],
    *,
    sector_size: int = 512,
    nonce: int = 0x12345678,
    count: int | None = None,
) -> bytes:
    header = JOURNAL_MAGIC + struct.pack(
        ">5I",
        len(records) if count is None else count,
        nonce,
        initial_pages,
        sector_size,
        page_size,
    )
    out = bytearray(header.ljust(sector_size, b"\x00"))
    for pgno, page in records:
        out += struct.pack(">I", pgno) + page
        out += struct.pack(">I", journal_record_checksum(nonce, page))
    return bytes(out)


def test_synthetic_rollback_rules(tmp_path: Path) -> None:
    page_size = 512
    db = tmp_path / "x.db"
    current = [bytes([0xC0 + i]) * page_size for i in range(6)]
    db.write_bytes(b"".join(current))  # six pages now, four before the transaction
    original = [bytes([0x10 + i]) * page_size for i in range(6)]
    journal = tmp_path / "x.db-journal"
    journal.write_bytes(
        _journal(
            page_size,
            4,
            [
                (2, original[1]),
                (2, b"\xee" * page_size),  # a later copy: the first one wins
                (6, original[5]),  # beyond the original size: skipped
                (4, original[3]),
            ],
        )
    )
    assert rollback_journal(journal, db) == 2
    assert db.read_bytes() == current[0] + original[1] + current[2] + original[3]


def test_synthetic_rollback_extends_short_database(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    db.write_bytes(b"\x01" * 512)
    journal = tmp_path / "x.db-journal"
    journal.write_bytes(_journal(512, 3, [(3, b"\x03" * 512)]))
    assert rollback_journal(journal, db) == 1
    assert db.read_bytes() == b"\x01" * 512 + bytes(512) + b"\x03" * 512


@pytest.mark.parametrize(
    ("field", "value"),
    [(24, 1000), (24, 256), (20, 16), (20, 3000)],  # page size, sector size
)
def test_invalid_first_header_changes_nothing(tmp_path: Path, field: int, value: int) -> None:
    db = tmp_path / "x.db"
    db.write_bytes(b"\x01" * 2048)
    raw = bytearray(_journal(512, 1, [(1, b"\x02" * 512)]))
    struct.pack_into(">I", raw, field, value)
    journal = tmp_path / "x.db-journal"
    journal.write_bytes(bytes(raw))
    assert rollback_journal(journal, db) == 0
    assert db.read_bytes() == b"\x01" * 2048
    assert list(iter_journal_records(io.BytesIO(bytes(raw)))) == []


def test_header_only_journal_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    db.write_bytes(b"\x01" * 2048)
    journal = tmp_path / "x.db-journal"
    journal.write_bytes(_journal(512, 1, [])[:100])  # header sector not fully written
    assert rollback_journal(journal, db) == 0
    assert db.read_bytes() == b"\x01" * 2048


def test_lock_page_record_stops_playback() -> None:
    page_size = 512
    lock = 0x40000000 // page_size + 1
    raw = _journal(page_size, 10, [(1, b"a" * 512), (lock, b"b" * 512), (2, b"c" * 512)])
    assert [r.pgno for r in iter_journal_records(io.BytesIO(raw))] == [1]


def test_record_checksum_samples_every_200_bytes() -> None:
    page = bytearray(1024)
    assert journal_record_checksum(5, page) == 5
    for offset in (824, 624, 424, 224, 24):
        page[offset] = 1
    page[0] = page[1023] = page[100] = 0xFF  # not sampled
    assert journal_record_checksum(5, page) == 10
    assert journal_record_checksum(0xFFFFFFFF, page) == 4  # wraps at 32 bits


def test_parse_journal_header() -> None:
    assert parse_journal_header(b"") is None
    assert parse_journal_header(bytes(28)) is None
    assert parse_journal_header(JOURNAL_MAGIC + bytes(19)) is None  # short
    header = parse_journal_header(JOURNAL_MAGIC + struct.pack(">5I", 3, 4, 5, 512, 4096))
    assert header is not None
    assert (header.record_count, header.nonce, header.initial_page_count) == (3, 4, 5)
    assert (header.sector_size, header.page_size) == (512, 4096)
    assert not header.until_end_of_file


def test_rollback_leaves_journal_and_is_repeatable(tmp_path: Path) -> None:
    # rollback_journal leaves deleting the journal to the caller (after it succeeded).
    hot = make_hot_journal(tmp_path, "truncate", "full")
    rollback_journal(hot.journal, hot.db)
    assert hot.journal.exists()
    shutil.copyfile(hot.journal, tmp_path / "again")
    # Playing the same journal twice is harmless: it only restores original pages.
    rollback_journal(tmp_path / "again", hot.db)
    assert hot.db.read_bytes() == hot.before
    os.unlink(tmp_path / "again")
