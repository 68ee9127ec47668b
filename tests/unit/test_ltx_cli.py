"""`litefspy ltx ...` as a user runs it: exit codes 0/1/2, output, one-line errors."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
LITEFS_LTX = FIXTURES / "ltx" / "litefs-000000000000000d-000000000000000d.ltx"


def ltx(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "litefspy", "ltx", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("litefspy: ")
    return lines[0]


@pytest.fixture
def database(tmp_path: Path) -> Path:
    db = tmp_path / "app.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size=1024")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i} " * 20,) for i in range(5000)])
    con.commit()
    con.close()
    return db


def test_verify_fixture_ok() -> None:
    res = ltx("verify", LITEFS_LTX)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (
        f"ok {LITEFS_LTX} 000000000000000d-000000000000000d 000000000000000d/fe3831a381c602b9\n"
    )


def test_verify_reports_each_failure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ltx"
    raw = bytearray(LITEFS_LTX.read_bytes())
    raw[5000] ^= 4
    bad.write_bytes(raw)
    res = ltx("verify", LITEFS_LTX, bad)
    assert res.stdout.startswith(f"ok {LITEFS_LTX} ")
    line = one_line_error(res)
    assert str(bad) in line and "file checksum mismatch" in line
    missing = ltx("verify", tmp_path / "nope.ltx")
    assert "nope.ltx" in one_line_error(missing)


def test_dump_fixture() -> None:
    res = ltx("dump", LITEFS_LTX)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "page size:          4096" in out
    assert "pre-apply checksum: 9c74a15b4e4f246c" in out
    assert "post-apply checksum: fe3831a381c602b9" in out
    assert "file checksum:       9496a29358326fb5" in out
    rows = [line.split() for line in out.splitlines()]
    numbers = [row[0] for row in rows if len(row) == 2 and row[0].isdigit()]
    assert numbers == ["1", "7", "8"]


def test_encode_apply_round_trip(tmp_path: Path, database: Path) -> None:
    for flag, name in (("--compress", "lz4.ltx"), ("--no-compress", "raw.ltx")):
        out = tmp_path / name
        res = ltx("encode-db", database, out, flag)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"wrote {out} 0000000000000001-0000000000000001 ")
        restored = tmp_path / f"restored-{name}.db"
        res = ltx("apply", "--db", restored, out)
        assert res.returncode == 0, res.stderr
        assert restored.read_bytes() == database.read_bytes()
        assert ltx("verify", out).returncode == 0


def test_apply_refusal_is_one_line(tmp_path: Path, database: Path) -> None:
    snap = tmp_path / "s.ltx"
    assert ltx("encode-db", database, snap).returncode == 0
    target = tmp_path / "other.db"
    target.write_bytes(database.read_bytes())
    res = ltx("apply", "--db", target, snap, LITEFS_LTX)
    line = one_line_error(res)
    assert "TXID gap" in line and LITEFS_LTX.name in line
    assert target.read_bytes() == database.read_bytes()


def test_encode_refuses_non_sqlite_and_uncheckpointed_wal(tmp_path: Path, database: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    line = one_line_error(ltx("encode-db", notes, tmp_path / "o.ltx"))
    assert "not a SQLite database" in line
    wal = Path(f"{database}-wal")
    wal.write_bytes(b"x" * 100)
    line = one_line_error(ltx("encode-db", database, tmp_path / "o.ltx"))
    assert "checkpoint" in line
    assert not (tmp_path / "o.ltx").exists()


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("verify",),
        ("apply", "x.ltx"),  # --db is required
        ("encode-db", "only-one-arg"),
        ("frobnicate",),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    res = ltx(*args)
    assert res.returncode == 2, res
    assert "error:" in res.stderr
