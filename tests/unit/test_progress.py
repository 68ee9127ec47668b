"""The progress tracker and the clean-stop checksum record, without a mount."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.progress import IMPORT, Progress, ProgressBoard, format_bytes
from litefspy.store import cleanstop


def test_progress_logs_throttled_with_rate_and_phase(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="litefspy.progress")
    quiet = Progress(IMPORT, "a.db", 4096, log_interval=3600)
    quiet.advance(1024)
    quiet.finished()
    assert caplog.records == []  # short work logs nothing

    chatty = Progress(IMPORT, "a.db", 4096, detail="receiving", log_interval=0)
    chatty.advance(1024)
    chatty.next_phase("writing", 2048)
    chatty.advance(2048)
    chatty.finished()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("import in progress db=a.db done=1.0KiB total=4.0KiB percent=25.0%")
    assert "phase=receiving" in lines[0]
    assert lines[-1].startswith("import done db=a.db done=2.0KiB total=2.0KiB percent=100.0%")
    assert "phase=writing" in lines[-1]
    assert "rate=" in lines[-1]


def test_board_lists_work_until_it_ends_either_way() -> None:
    board = ProgressBoard()
    with board.track(IMPORT, "a.db", 100, detail="receiving") as progress:
        progress.advance(40)
        [report] = board.reports()
        assert (report.kind, report.name, report.done_bytes, report.total_bytes) == (
            IMPORT,
            "a.db",
            40,
            100,
        )
        assert report.fraction == 0.4
        assert report.detail == "receiving"
    assert board.reports() == []
    with pytest.raises(RuntimeError), board.track(IMPORT, "b.db", 10):
        raise RuntimeError("upload cut")
    assert board.reports() == []
    started = board.start(IMPORT, "c.db", 0)
    board.stop(started)
    board.stop(started)  # idempotent
    assert board.reports() == []


def test_format_bytes() -> None:
    assert format_bytes(0) == "0B"
    assert format_bytes(1536) == "1.5KiB"
    assert format_bytes(3 << 30) == "3.0GiB"


def _files(tmp_path: Path) -> tuple[PageChecksums, Path, Path]:
    sums = PageChecksums(4096)
    for pgno in range(1, 9):
        sums.set(pgno, page_checksum(pgno, bytes([pgno]) * 4096))
    db = tmp_path / "database"
    db.write_bytes(bytes(8 * 4096))
    ltx = tmp_path / "0000000000000003-0000000000000003.ltx"
    ltx.write_bytes(b"ltx")
    return sums, db, ltx


def test_clean_sums_round_trip_and_consumed(tmp_path: Path) -> None:
    sums, db, ltx = _files(tmp_path)
    assert cleanstop.save(tmp_path, 3, sums, db, ltx)
    saved = cleanstop.take(tmp_path)
    assert saved is not None
    assert (saved.txid, saved.checksum) == (3, sums.total)
    assert saved.checksums == sums and saved.checksums.total == sums.total
    assert saved.database == cleanstop.FileStamp.of(db)
    assert saved.ltx_unchanged(ltx)
    assert cleanstop.take(tmp_path) is None  # a crash after this start leaves none
    os.utime(ltx, ns=(1, 1))
    assert not saved.ltx_unchanged(ltx)


def test_damaged_clean_sums_are_ignored(tmp_path: Path) -> None:
    sums, db, ltx = _files(tmp_path)
    assert cleanstop.save(tmp_path, 3, sums, db, ltx)
    path = tmp_path / cleanstop.CLEAN_SUMS
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cleanstop.take(tmp_path) is None
    assert not path.exists()
    path.write_bytes(b"not json\n")
    assert cleanstop.take(tmp_path) is None
    assert not cleanstop.save(tmp_path, 3, sums, tmp_path / "missing", ltx)
