"""ChecksumChanges: in-place checksum updates that can be rolled back exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.store.types import ChecksumChanges

PAGE = 512


def _sums(count: int) -> PageChecksums:
    sums = PageChecksums(PAGE)
    for pgno in range(1, count + 1):
        sums.set(pgno, page_checksum(pgno, bytes([pgno % 251]) * PAGE))
    return sums


ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(1, 60), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 60), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(0, 40), operations=ops)
def test_rollback_restores_exactly(count: int, operations: list[tuple[str, int, int]]) -> None:
    sums = _sums(count)
    before = sums.copy()
    changes = ChecksumChanges(sums)
    for op, n, fill in operations:
        if op == "set":
            changes.set(n, page_checksum(n, bytes([fill]) * PAGE))
        else:
            changes.truncate(n)
    changes.rollback()
    assert sums == before
    assert sums.total == before.total


def test_changes_apply_in_place_when_kept() -> None:
    sums = _sums(5)
    changes = ChecksumChanges(sums)
    changes.set(2, page_checksum(2, b"\x07" * PAGE))
    changes.truncate(4)
    expected = _sums(5)
    expected.set(2, page_checksum(2, b"\x07" * PAGE))
    expected.truncate(4)
    assert sums == expected and changes.original_count == 5
