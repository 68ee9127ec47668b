"""Merging contiguous LTX files gives the same database as applying them one by one."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from litefspy.errors import LTXError
from litefspy.ltx.apply import apply_files
from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.ltx.decoder import Decoder, verify_file
from litefspy.ltx.encoder import write_ltx_file
from litefspy.ltx.format import CHECKSUM_FLAG, Header, lock_pgno
from litefspy.ltx.merge import merge_files

PAGE = 512


def _header(min_txid: int, max_txid: int, commit: int, pre: int, ts: int) -> Header:
    return Header(
        flags=0,
        page_size=PAGE,
        commit=commit,
        min_txid=min_txid,
        max_txid=max_txid,
        timestamp=ts,
        pre_apply_checksum=pre,
        wal_offset=0,
        wal_size=0,
        wal_salt1=0,
        wal_salt2=0,
        node_id=7,
    )


def _chain(tmp: Path, rng: random.Random, n: int) -> list[Path]:
    """A snapshot then n-1 incremental files that change, grow and shrink the database."""
    state: dict[int, bytes] = {}
    sums = PageChecksums(PAGE)
    lock = lock_pgno(PAGE)
    paths = []
    commit = rng.randint(3, 20)
    for txid in range(1, n + 1):
        pre = 0 if txid == 1 else sums.total
        if txid == 1:
            changed = list(range(1, commit + 1))
        else:
            commit = max(1, commit + rng.randint(-3, 4))
            grown = [p for p in range(1, commit + 1) if p not in state]
            changed = sorted(set(grown) | {rng.randint(1, commit) for _ in range(3)})
        for pgno in list(state):
            if pgno > commit:
                del state[pgno]
        pages = []
        for pgno in changed:
            if pgno == lock:
                continue
            data = rng.randbytes(PAGE)
            state[pgno] = data
            pages.append((pgno, data))
        sums.truncate(commit)
        for pgno, data in pages:
            sums.set(pgno, page_checksum(pgno, data))
        path = tmp / f"{txid:016x}-{txid:016x}.ltx"
        write_ltx_file(path, _header(txid, txid, commit, pre, 1000 + txid), pages, sums.total)
        paths.append(path)
    return paths


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("compress", [False, True])
def test_merge_equals_applying_in_order(tmp_path: Path, seed: int, compress: bool) -> None:
    rng = random.Random(seed)
    paths = _chain(tmp_path, rng, rng.randint(2, 12))
    cut = rng.randint(1, len(paths) - 1)
    # The base state, then the rest one by one...
    one_by_one = tmp_path / "one.db"
    expected = apply_files(one_by_one, paths)
    # ...and the same with the tail merged into one file.
    merged = tmp_path / "merged.ltx"
    with open(merged, "wb") as f:
        header, trailer = merge_files(paths[cut:], f, compress=compress)
    assert (header.min_txid, header.max_txid) == (cut + 1, len(paths))
    assert header.timestamp == 1000 + len(paths)
    assert header.compressed == compress
    verify_file(merged)
    via_merge = tmp_path / "via.db"
    apply_files(via_merge, paths[:cut])
    assert apply_files(via_merge, [merged]) == expected
    assert via_merge.read_bytes() == one_by_one.read_bytes()
    # A merge that starts with the snapshot is a snapshot of the whole state.
    snap = tmp_path / "snap.ltx"
    with open(snap, "wb") as f:
        header, trailer = merge_files(paths, f, compress=compress)
    assert header.is_snapshot and trailer.post_apply_checksum == expected[1]
    fresh = tmp_path / "fresh.db"
    assert apply_files(fresh, [snap]) == expected
    assert fresh.read_bytes() == one_by_one.read_bytes()


def test_merge_refuses_what_does_not_continue(tmp_path: Path) -> None:
    paths = _chain(tmp_path, random.Random(1), 4)
    out = tmp_path / "out.ltx"
    with open(out, "wb") as f, pytest.raises(LTXError, match="starts at TXID"):
        merge_files([paths[1], paths[3]], f)
    with open(out, "wb") as f, pytest.raises(LTXError, match="only the first file"):
        merge_files([paths[1], paths[0]], f)
    (tmp_path / "x").mkdir()
    other = _chain(tmp_path / "x", random.Random(2), 3)
    with open(out, "wb") as f, pytest.raises(LTXError, match="does not continue"):
        merge_files([paths[1], other[2]], f)


def test_merge_refuses_a_corrupt_input(tmp_path: Path) -> None:
    paths = _chain(tmp_path, random.Random(3), 3)
    raw = bytearray(paths[1].read_bytes())
    raw[len(raw) // 2] ^= 1
    paths[1].write_bytes(bytes(raw))
    with open(tmp_path / "out.ltx", "wb") as f, pytest.raises(LTXError):
        merge_files(paths[1:], f)


def test_merge_through_a_deletion_keeps_nothing_from_before_it(tmp_path: Path) -> None:
    """Deleted then made anew (another page size) in one range: only the new pages remain."""
    paths = _chain(tmp_path, random.Random(4), 4)
    post = verify_file(paths[-1])[1].post_apply_checksum
    gone = tmp_path / "deletion.ltx"
    write_ltx_file(gone, _header(5, 5, 0, post, 2000), [], CHECKSUM_FLAG)
    # The merge that ends with the deletion is itself a deletion.
    out = tmp_path / "ends-deleted.ltx"
    with open(out, "wb") as f:
        header, trailer = merge_files([*paths[1:], gone], f)
    assert header.commit == 0 and trailer.post_apply_checksum == CHECKSUM_FLAG
    verify_file(out)
    # Made anew with a bigger page size: 2 pages, both written.
    new_size = PAGE * 2
    pages = [(1, b"a" * new_size), (2, b"b" * new_size)]
    sums = PageChecksums(new_size)
    for pgno, data in pages:
        sums.set(pgno, page_checksum(pgno, data))
    header6 = _header(6, 6, 2, CHECKSUM_FLAG, 3000)
    again = tmp_path / "again.ltx"
    write_ltx_file(again, dataclasses.replace(header6, page_size=new_size), pages, sums.total)
    out = tmp_path / "through.ltx"
    with open(out, "wb") as f:
        header, trailer = merge_files([*paths[1:], gone, again], f)
    assert (header.min_txid, header.max_txid, header.commit) == (2, 6, 2)
    assert header.page_size == new_size and trailer.post_apply_checksum == sums.total
    verify_file(out)
    with open(out, "rb") as f:
        assert list(Decoder(f).pages()) == pages
