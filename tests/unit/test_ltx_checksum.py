"""CRC-64 known answers and the rolling database checksum."""

from __future__ import annotations

import io
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litefspy.errors import LTXError, SQLiteFormatError
from litefspy.ltx.checksum import (
    PageChecksums,
    checksum_database_file,
    crc64,
    page_checksum,
)
from litefspy.ltx.format import CHECKSUM_FLAG, lock_pgno


def test_crc64_known_answer() -> None:
    assert crc64(b"123456789") == 0xB90956C775A41001


def test_crc64_continues_with_initial() -> None:
    data = os.urandom(5000)
    assert crc64(data[1234:], crc64(data[:1234])) == crc64(data)
    assert crc64(memoryview(data)[10:]) == crc64(data[10:])


def test_page_checksum_known_answers() -> None:
    zeros = bytes(4096)
    assert page_checksum(1, zeros) == 0xD9328F592D9E733D
    assert page_checksum(2, zeros) == 0xF7901E47304CA33F
    assert page_checksum(2, memoryview(bytearray(zeros))) == 0xF7901E47304CA33F


def test_empty_database_checksum_is_flag() -> None:
    sums = PageChecksums(4096)
    assert sums.total == CHECKSUM_FLAG
    assert sums.page_count == 0
    assert checksum_database_file(io.BytesIO(), 4096) == CHECKSUM_FLAG


def random_db(page_size: int, pages: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(page_size * pages)


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_from_file_matches_page_by_page(page_size: int) -> None:
    n = max(3, (3 << 20) // page_size)  # several read chunks' worth at small page sizes
    data = random_db(page_size, n, page_size)
    sums = PageChecksums.from_file(io.BytesIO(data), page_size)
    assert sums.page_count == n
    xor = 0
    for pgno in range(1, n + 1):
        ck = page_checksum(pgno, data[(pgno - 1) * page_size : pgno * page_size])
        assert sums.get(pgno) == ck
        xor ^= ck
    assert sums.total == CHECKSUM_FLAG | xor
    assert checksum_database_file(io.BytesIO(data), page_size) == sums.total


def test_from_file_with_page_count_and_short_file() -> None:
    data = random_db(512, 10, 1)
    part = PageChecksums.from_file(io.BytesIO(data), 512, 4)
    assert part.page_count == 4
    assert part.total == PageChecksums.from_file(io.BytesIO(data[: 4 * 512]), 512).total
    with pytest.raises(SQLiteFormatError, match="10 whole pages, expected 11"):
        PageChecksums.from_file(io.BytesIO(data), 512, 11)


def test_set_get_and_incremental_total() -> None:
    sums = PageChecksums(512)
    a, b = page_checksum(1, bytes(512)), page_checksum(1, b"x" * 512)
    sums.set(1, a)
    assert sums.total == CHECKSUM_FLAG | a
    sums.set(1, b)
    assert sums.total == CHECKSUM_FLAG | b
    assert sums.get(0) == 0 and sums.get(2) == 0
    copy = sums.copy()
    copy.update_page(1, bytes(512))
    assert sums.total == CHECKSUM_FLAG | b  # the copy is independent
    assert copy.total == CHECKSUM_FLAG | a
    with pytest.raises(LTXError):
        sums.set(0, a)
    with pytest.raises(LTXError):
        sums.update_page(1, b"short")


def test_growth_and_truncate_mirror_the_file() -> None:
    """Writing past the end leaves zero pages, as in the file; truncate drops or adds them."""
    sums = PageChecksums(512)
    sums.update_page(4, b"d" * 512)
    f = io.BytesIO()
    f.seek(3 * 512)
    f.write(b"d" * 512)
    assert sums.page_count == 4
    assert sums.get(2) == page_checksum(2, bytes(512))
    assert sums.total == checksum_database_file(f, 512)
    sums.truncate(2)
    assert sums.total == checksum_database_file(io.BytesIO(bytes(1024)), 512)
    sums.truncate(6)
    assert sums.total == checksum_database_file(io.BytesIO(bytes(6 * 512)), 512)
    sums.truncate(0)
    assert sums.total == CHECKSUM_FLAG


def test_lock_page_counts_as_zero() -> None:
    page_size = 65536
    lock = lock_pgno(page_size)
    sums = PageChecksums(page_size)
    with pytest.raises(LTXError, match="lock page"):
        sums.set(lock, CHECKSUM_FLAG | 1)
    sums.update_page(lock + 1, b"z" * page_size)  # grows across the lock page
    assert sums.page_count == lock + 1
    assert sums.get(lock) == 0
    expected = page_checksum(lock + 1, b"z" * page_size)
    for pgno in range(1, lock):
        expected ^= page_checksum(pgno, bytes(page_size))
    assert sums.total == CHECKSUM_FLAG | expected
    sums.truncate(lock - 1)
    sums.truncate(lock + 1)
    assert sums.get(lock) == 0
    assert sums.total == CHECKSUM_FLAG | expected ^ page_checksum(
        lock + 1, b"z" * page_size
    ) ^ page_checksum(lock + 1, bytes(page_size))


def test_clear_and_replace() -> None:
    sums = PageChecksums(512)
    sums.update_page(1, b"a" * 512)
    other = PageChecksums(1024)
    other.update_page(2, b"b" * 1024)
    sums.replace_with(other)
    assert sums == other and sums.page_size == 1024
    sums.clear(4096)
    assert sums.page_count == 0 and sums.page_size == 4096 and sums.total == CHECKSUM_FLAG
    with pytest.raises(LTXError):
        PageChecksums(1000)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 40), st.integers(0, 2**32)),
        st.tuples(st.just("truncate"), st.integers(0, 40), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_rolling_checksum_equals_full_recompute(operations: list[tuple[str, int, int]]) -> None:
    """Any sequence of page writes and truncations keeps the rolling total exact."""
    page_size = 512
    sums = PageChecksums(page_size)
    f = io.BytesIO()
    for op, n, seed in operations:
        if op == "write":
            data = random.Random(seed).randbytes(page_size)
            sums.update_page(n, data)
            f.seek((n - 1) * page_size)
            f.write(data)
        else:
            sums.truncate(n)
            f.truncate(n * page_size)
            # BytesIO does not extend on truncate; a real file does (with zeros).
            size = f.seek(0, io.SEEK_END)
            f.write(bytes(n * page_size - size))
    assert sums.page_count == len(f.getvalue()) // page_size
    assert sums == PageChecksums.from_file(f, page_size)
    assert sums.total == checksum_database_file(f, page_size)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 300), st.integers(0, 40), st.integers(0, 1000)),
        min_size=1,
        max_size=12,
    )
)
def test_set_run_equals_setting_each_page(runs: list[tuple[int, int, int]]) -> None:
    """Recording a run of consecutive pages at once is the same as one page at a time."""
    page_size = 512  # the lock page (2097153) is far away: runs never touch it
    one_by_one, at_once = PageChecksums(page_size), PageChecksums(page_size)
    for start, n, seed in runs:
        rng = random.Random(seed)
        values = [CHECKSUM_FLAG | rng.getrandbits(63) for _ in range(n)]
        for i, value in enumerate(values):
            one_by_one.set(start + i, value)
        at_once.set_run(start, values)
        assert at_once == one_by_one
        assert at_once.total == one_by_one.total
        assert at_once.page_count == one_by_one.page_count


def test_set_run_refuses_the_lock_page() -> None:
    sums = PageChecksums(512)
    lock = lock_pgno(512)
    with pytest.raises(LTXError, match="lock page"):
        sums.set_run(lock - 1, [CHECKSUM_FLAG, CHECKSUM_FLAG])
    with pytest.raises(LTXError, match="invalid page number"):
        sums.set_run(0, [CHECKSUM_FLAG])
