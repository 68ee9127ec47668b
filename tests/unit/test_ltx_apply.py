"""Snapshots of real SQLite databases, applying chains of LTX files, and refusals."""

from __future__ import annotations

import dataclasses
import io
import random
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from litefspy.errors import LTXChecksumError, LTXError, SQLiteFormatError
from litefspy.ltx.apply import apply_files, apply_ltx, encode_database
from litefspy.ltx.checksum import PageChecksums, checksum_database_file
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.encoder import write_ltx_file
from litefspy.ltx.format import CHECKSUM_FLAG, Header, lock_pgno


def build_db(path: Path, page_size: int, size_bytes: int, seed: int = 1) -> None:
    """A real database with several tables and an index, about size_bytes large."""
    rnd = random.Random(seed)
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={page_size}")
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, email TEXT)")
    con.execute("CREATE TABLE posts (id INTEGER PRIMARY KEY, user_id INT, body TEXT)")
    con.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
    con.execute("CREATE INDEX posts_user ON posts(user_id)")
    i = 0
    while path.stat().st_size < size_bytes:
        con.executemany(
            "INSERT INTO users VALUES (?, ?, ?)",
            [(i + k, f"user{i + k}", f"u{i + k}@example.com") for k in range(500)],
        )
        con.executemany(
            "INSERT INTO posts (user_id, body) VALUES (?, ?)",
            [(rnd.randrange(i + 500), "lorem ipsum " * rnd.randrange(1, 40)) for _ in range(500)],
        )
        con.executemany(
            "INSERT INTO blobs (data) VALUES (?)", [(rnd.randbytes(300),) for _ in range(100)]
        )
        con.commit()
        i += 500
    con.close()


def modify_db(path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    con = sqlite3.connect(path)
    con.execute("UPDATE users SET name = name || '!' WHERE id % 37 = ?", (seed % 37,))
    con.execute("DELETE FROM posts WHERE id % 11 = ?", (seed % 11,))
    con.executemany(
        "INSERT INTO blobs (data) VALUES (?)", [(rnd.randbytes(2000),) for _ in range(200)]
    )
    con.commit()
    con.close()


def shrink_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("DELETE FROM blobs")
    con.execute("DELETE FROM posts WHERE id % 2 = 0")
    con.commit()
    con.execute("VACUUM")
    con.close()


def integrity(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


def db_checksum(data: bytes, page_size: int) -> int:
    return checksum_database_file(io.BytesIO(data), page_size)


def write_incremental(
    path: Path,
    old: bytes,
    new: bytes,
    page_size: int,
    txid: int,
    *,
    pre: int | None = None,
    post: int | None = None,
    compress: bool = False,
) -> Path:
    """An LTX file turning database bytes `old` into `new` (changed pages only)."""
    commit = len(new) // page_size
    lock = lock_pgno(page_size)
    pages = []
    for pgno in range(1, commit + 1):
        a = old[(pgno - 1) * page_size : pgno * page_size]
        b = new[(pgno - 1) * page_size : pgno * page_size]
        if a != b and pgno != lock:
            pages.append((pgno, b))
    header = Header(
        flags=1 if compress else 0,
        page_size=page_size,
        commit=commit,
        min_txid=txid,
        max_txid=txid,
        timestamp=1_700_000_000_000 + txid,
        pre_apply_checksum=db_checksum(old, page_size) if pre is None else pre,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=1,
    )
    write_ltx_file(path, header, pages, db_checksum(new, page_size) if post is None else post)
    return path


# --- snapshots of real databases --------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["lz4", "raw"])
@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_encode_then_apply_is_byte_identical(
    tmp_path: Path, page_size: int, compress: bool
) -> None:
    db = tmp_path / "src.db"
    build_db(db, page_size, 3 << 20)
    original = db.read_bytes()
    snap = tmp_path / "snap.ltx"
    header, trailer = encode_database(db, snap, compress=compress, node_id=9, timestamp_ms=123)
    assert header.page_size == page_size
    assert header.commit == len(original) // page_size
    assert header.is_snapshot and header.compressed == compress
    assert (header.node_id, header.timestamp) == (9, 123)
    assert trailer.post_apply_checksum == db_checksum(original, page_size)
    assert verify_file(snap) == (header, trailer)

    restored = tmp_path / "restored.db"
    assert apply_files(restored, [snap]) == (1, trailer.post_apply_checksum)
    assert restored.read_bytes() == original
    assert integrity(restored) == "ok"


def test_snapshot_txid_range(tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    build_db(db, 4096, 100_000)
    header, _ = encode_database(db, tmp_path / "s.ltx", txid=42)
    assert (header.min_txid, header.max_txid) == (1, 42)
    assert apply_files(tmp_path / "r.db", [tmp_path / "s.ltx"])[0] == 42


def test_encode_database_rejects_non_sqlite(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_bytes(b"hello world\n" * 1000)
    with pytest.raises(SQLiteFormatError, match="not a SQLite database"):
        encode_database(bogus, tmp_path / "out.ltx")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(SQLiteFormatError, match="not a SQLite database"):
        encode_database(empty, tmp_path / "out.ltx")
    db = tmp_path / "ok.db"
    build_db(db, 4096, 10_000)
    with open(db, "ab") as f:
        f.write(b"partial page")
    with pytest.raises(SQLiteFormatError, match="whole number"):
        encode_database(db, tmp_path / "out.ltx")
    assert not (tmp_path / "out.ltx").exists()


# --- chains of incremental files --------------------------------------------------


@dataclasses.dataclass
class History:
    v1: bytes
    v2: bytes
    v3: bytes
    snap: Path
    i2: Path
    i3: Path


@pytest.fixture
def history(tmp_path: Path) -> History:
    """v1 (snapshot 1), v2 (grown, txid 2), v3 (vacuumed smaller, txid 3)."""
    page_size = 4096
    db = tmp_path / "live.db"
    build_db(db, page_size, 1 << 20)
    v1 = db.read_bytes()
    snap = tmp_path / "0000000000000001-0000000000000001.ltx"
    encode_database(db, snap)
    modify_db(db, 2)
    v2 = db.read_bytes()
    i2 = write_incremental(tmp_path / "i2.ltx", v1, v2, page_size, 2, compress=True)
    shrink_db(db)
    v3 = db.read_bytes()
    assert len(v3) < len(v2)
    i3 = write_incremental(tmp_path / "i3.ltx", v2, v3, page_size, 3)
    return History(v1, v2, v3, snap, i2, i3)


def test_apply_chain_from_snapshot(tmp_path: Path, history: History) -> None:
    v3 = history.v3
    target = tmp_path / "replica.db"
    txid, checksum = apply_files(target, [history.snap, history.i2, history.i3])
    assert target.read_bytes() == v3
    assert (txid, checksum) == (3, db_checksum(v3, 4096))
    assert integrity(target) == "ok"


def test_apply_continues_existing_database(tmp_path: Path, history: History) -> None:
    target = tmp_path / "replica.db"
    target.write_bytes(history.v1)
    apply_files(target, [history.i2])
    assert target.read_bytes() == history.v2
    apply_files(target, [history.i3])
    assert target.read_bytes() == history.v3


def test_apply_ltx_keeps_rolling_checksums(tmp_path: Path, history: History) -> None:
    target = tmp_path / "replica.db"
    sums = PageChecksums(4096)
    with open(target, "w+b") as db:
        for path in (history.snap, history.i2, history.i3):
            with open(path, "rb") as ltx:
                _, trailer = apply_ltx(db, ltx, sums)
            assert sums.total == trailer.post_apply_checksum
            assert sums == PageChecksums.from_file(db, 4096)
    assert target.read_bytes() == history.v3


def test_snapshot_replaces_other_database(tmp_path: Path, history: History) -> None:
    target = tmp_path / "replica.db"
    target.write_bytes(history.v2)
    apply_files(target, [history.snap])
    assert target.read_bytes() == history.v1


def test_commit_zero_deletes_database(tmp_path: Path, history: History) -> None:
    target = tmp_path / "replica.db"
    target.write_bytes(history.v1)
    gone = write_incremental(tmp_path / "del.ltx", history.v1, b"", 4096, 2)
    assert apply_files(target, [gone]) == (2, CHECKSUM_FLAG)
    assert not target.exists()


# --- refusals leave the database untouched ----------------------------------------


def refused(
    tmp_path: Path, start: bytes | None, files: list[Path], error: type[Exception], match: str
) -> None:
    target = tmp_path / "replica.db"
    target.unlink(missing_ok=True)
    if start is not None:
        target.write_bytes(start)
    with pytest.raises(error, match=match):
        apply_files(target, files)
    if start is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == start


def test_refuses_txid_gap(tmp_path: Path, history: History) -> None:
    files = [history.snap, history.i3]
    refused(tmp_path, None, files, LTXError, "TXID gap")
    refused(tmp_path, history.v1, files, LTXError, "TXID gap")


def test_refuses_wrong_pre_apply(tmp_path: Path, history: History) -> None:
    refused(tmp_path, history.v1, [history.i3], LTXChecksumError, "pre-apply")
    # A missing database is empty: an incremental cannot start from it.
    refused(tmp_path, None, [history.i2], LTXChecksumError, "pre-apply")


def test_refuses_wrong_post_apply(tmp_path: Path, history: History) -> None:
    bad = write_incremental(
        tmp_path / "bad.ltx",
        history.v1,
        history.v2,
        4096,
        2,
        post=CHECKSUM_FLAG | 0xBAD,
    )
    refused(tmp_path, history.v1, [bad], LTXChecksumError, "post-apply")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_refuses_corrupt_file_anywhere_in_chain(
    tmp_path: Path, history: History, damage: str
) -> None:
    raw = bytearray(Path(history.i3).read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    else:
        del raw[len(raw) - 100 :]
    bad = tmp_path / "i3-bad.ltx"
    bad.write_bytes(raw)
    # i2 is fine, but nothing is applied because i3 is checked first.
    refused(tmp_path, history.v1, [history.i2, bad], LTXError, "i3-bad.ltx")


def test_apply_ltx_failure_leaves_db_and_checksums(tmp_path: Path, history: History) -> None:
    target = tmp_path / "replica.db"
    target.write_bytes(history.v1)
    raw = bytearray(Path(history.i2).read_bytes())
    raw[-20] ^= 1
    with open(target, "r+b") as db:
        sums = PageChecksums.from_file(db, 4096)
        before = sums.copy()
        with pytest.raises(LTXError):
            apply_ltx(db, io.BytesIO(bytes(raw)), sums)
        assert sums == before and sums.total == before.total
        # Without a checksum object the database's is computed from the file.
        with open(history.i3, "rb") as ltx, pytest.raises(LTXChecksumError, match="pre-apply"):
            apply_ltx(db, ltx, None)
    assert target.read_bytes() == history.v1


def test_refuses_page_size_mismatch(tmp_path: Path, history: History) -> None:
    target = tmp_path / "replica.db"
    target.write_bytes(history.v1[:-1024])
    refused(tmp_path, target.read_bytes(), [history.i2], LTXError, "multiple")


# --- the lock page (databases over 1 GiB) -----------------------------------------


@pytest.fixture
def big_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, removed right after the test: pytest keeps old tmp dirs, not GiB files."""
    yield tmp_path
    shutil.rmtree(tmp_path)


def test_incremental_across_lock_page_on_sparse_file(big_dir: Path) -> None:
    tmp_path = big_dir
    page_size = 4096
    lock = lock_pgno(page_size)
    db = tmp_path / "small.db"
    build_db(db, page_size, 50_000)
    old = db.read_bytes()
    pages = [(lock - 1, b"a" * page_size), (lock + 1, b"b" * page_size)]
    with open(db, "rb") as f:
        sums = PageChecksums.from_file(f, page_size)
    pre = sums.total
    for pgno, data in pages:
        sums.update_page(pgno, data)
    sums.truncate(lock + 1)
    header = Header(0, page_size, lock + 1, 2, 2, 0, pre, 0, 0, 0, 0, 0)
    ltx = tmp_path / "big.ltx"
    write_ltx_file(ltx, header, pages, sums.total)
    assert apply_files(db, [ltx]) == (2, sums.total)
    assert db.stat().st_size == (lock + 1) * page_size
    with open(db, "rb") as f:
        assert f.read(len(old)) == old
        f.seek((lock - 2) * page_size)
        assert f.read(3 * page_size) == b"a" * page_size + bytes(page_size) + b"b" * page_size
        assert checksum_database_file(f, page_size) == sums.total


@pytest.mark.slow
def test_snapshot_over_one_gib_round_trips(big_dir: Path) -> None:
    """A snapshot spanning the lock page applies (lock page zeroed) and re-encodes identically."""
    tmp_path = big_dir
    page_size = 4096
    lock = lock_pgno(page_size)
    commit = lock + 64
    seed_db = tmp_path / "seed.db"
    build_db(seed_db, page_size, 40_000)
    seed = seed_db.read_bytes()
    special = {
        lock - 1: b"L" * page_size,
        lock + 1: b"R" * page_size,
        commit: b"E" * page_size,
    }
    zero = bytes(page_size)

    def pages() -> Iterator[tuple[int, bytes]]:
        for pgno in range(1, commit + 1):
            if pgno == lock:
                continue
            if pgno * page_size <= len(seed):
                yield pgno, seed[(pgno - 1) * page_size : pgno * page_size]
            else:
                yield pgno, special.get(pgno, zero)

    sums = PageChecksums(page_size)
    for pgno, data in pages():
        sums.update_page(pgno, data)
    header = Header(1, page_size, commit, 1, 5, 1_700_000_000_000, 0, 0, 0, 0, 0, 3)
    ltx = tmp_path / "0000000000000001-0000000000000005.ltx"
    write_ltx_file(ltx, header, pages(), sums.total)
    assert ltx.stat().st_size < 16 << 20
    assert verify_file(ltx)[0] == header

    # An older file at the target has junk where the lock page goes.
    target = tmp_path / "big.db"
    with open(target, "wb") as f:
        f.seek((lock - 1) * page_size)
        f.write(b"\xff" * page_size)
    assert apply_files(target, [ltx]) == (5, sums.total)
    assert target.stat().st_size == commit * page_size
    with open(target, "rb") as f:
        assert f.read(len(seed)) == seed
        f.seek((lock - 2) * page_size)
        assert f.read(3 * page_size) == special[lock - 1] + zero + special[lock + 1]
        assert checksum_database_file(f, page_size) == sums.total

    again = tmp_path / "again.ltx"
    header2, trailer2 = encode_database(
        target, again, txid=5, compress=True, node_id=3, timestamp_ms=1_700_000_000_000
    )
    assert header2 == header
    assert trailer2.post_apply_checksum == sums.total
    assert again.read_bytes() == ltx.read_bytes()
    with open(again, "rb") as f:
        assert sum(1 for _ in Decoder(f).pages()) == commit - 1


def test_unreadable_file_is_named(tmp_path: Path, history: History) -> None:
    """apply_files reads every header before anything else and names the broken file."""
    junk = tmp_path / "junk.ltx"
    junk.write_bytes(b"LTX1" + bytes(10))
    refused(tmp_path, history.v1, [history.i2, junk], LTXError, "junk.ltx: truncated")
