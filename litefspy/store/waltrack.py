"""Infers WAL commits from the stream of writes to `NAME-wal`.

litefspy cannot see SQLite's locks (DESIGN.md decision 2), so a WAL transaction
is taken as committed at the moment its commit frame is valid and fully written:
salts equal to the WAL header's and a checksum that continues the chain from the
last committed frame. Validation is incremental: frames validated once stay
validated unless a later write lands on them (SQLite rewrites frames of the open
transaction in place and then rewrites their headers with fresh checksums), and
validation only runs when a write touches a frame whose header has a non-zero
commit field, so a transaction's frames are checksummed about once each.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from litefspy.errors import SQLiteFormatError
from litefspy.logs import kv
from litefspy.sqlite.wal import (
    WAL_FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WALHeader,
    frame_checksum,
    parse_frame_header,
    parse_wal_header,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WALCommit:
    """One committed WAL transaction: where its frames are and which pages it wrote."""

    start: int  # offset of its first frame
    end: int  # offset just past its commit frame
    commit: int  # database size in pages after the transaction
    pages: dict[int, int]  # pgno -> offset of the page data of its last frame in the txn
    salt1: int
    salt2: int


@dataclass
class WALTracker:
    """Per-database WAL state kept from the writes the daemon passes through."""

    name: str
    header: WALHeader | None = None
    committed_end: int = 0
    chain: tuple[int, int] = (0, 0)
    # Frames after committed_end already found valid, and the chain after them.
    valid_end: int = 0
    valid_chain: tuple[int, int] = (0, 0)
    pending_pages: dict[int, int] = field(default_factory=dict)
    # pgno -> page data offset of its newest committed frame in this WAL generation.
    index: dict[int, int] = field(default_factory=dict)

    @property
    def frame_size(self) -> int:
        assert self.header is not None
        return WAL_FRAME_HEADER_SIZE + self.header.page_size

    def reset(self) -> None:
        """Forget the WAL (deleted, truncated to 0): every committed frame was checkpointed."""
        self.header = None
        self.committed_end = self.valid_end = 0
        self.chain = self.valid_chain = (0, 0)
        self.pending_pages.clear()
        self.index.clear()

    def _start_generation(self, header: WALHeader) -> None:
        # A new header means SQLite restarted the log after a complete checkpoint:
        # the database file now holds every page, so the old index is obsolete.
        self.reset()
        self.header = header
        self.committed_end = self.valid_end = WAL_HEADER_SIZE
        self.chain = self.valid_chain = (header.checksum1, header.checksum2)

    def on_write(self, fd: int, offset: int, length: int) -> WALCommit | None:
        """Account for `length` bytes just written at `offset`.

        Returns the first transaction this write completed, if any. The caller makes
        it durable and then calls `accept` (and `next_commit` for any further one,
        e.g. the padding copies of a commit frame), or `reject` if it could not.
        """
        if offset < WAL_HEADER_SIZE:
            if offset == 0 and length >= WAL_HEADER_SIZE:
                raw = os.pread(fd, WAL_HEADER_SIZE, 0)
                try:
                    header = parse_wal_header(raw)
                except SQLiteFormatError as exc:
                    log.warning("invalid WAL header written %s", kv(db=self.name, error=exc))
                    self.reset()
                    return None
                self._start_generation(header)
                if length == WAL_HEADER_SIZE:
                    return None
            else:
                # A partial header write: wait for the complete header.
                self.reset()
                return None
        if self.header is None:
            return None
        fsize = self.frame_size
        first = max(offset, WAL_HEADER_SIZE)
        end = offset + length
        first_frame = (first - WAL_HEADER_SIZE) // fsize
        last_frame = (end - 1 - WAL_HEADER_SIZE) // fsize
        frame_start = WAL_HEADER_SIZE + first_frame * fsize
        if frame_start < self.committed_end:
            # The kernel splits a write that starts inside a page at the page
            # boundary; the tail piece can land after its frame already validated
            # (its stale bytes were identical). Nothing to capture again.
            log.debug(
                "write into committed WAL frames ignored for capture %s",
                kv(db=self.name, offset=offset, committed_end=self.committed_end),
            )
            frame_start = self.committed_end
        if frame_start < self.valid_end:
            self._rewind()
        if not self._touches_commit_frame(fd, first_frame, last_frame):
            return None
        return self.next_commit(fd)

    def on_truncate(self, size: int) -> None:
        """The WAL file was truncated (checkpoint TRUNCATE, journal_size_limit)."""
        if size == 0 or self.header is None:
            self.reset()
            return
        if size < self.committed_end:
            # SQLite only shrinks the log past a restart; treat it as a fresh log.
            self.reset()
        elif size < self.valid_end:
            self.valid_end = self.committed_end
            self.valid_chain = self.chain
            self.pending_pages.clear()

    def _rewind(self) -> None:
        """A frame of the open transaction was rewritten: validate it again from its start.

        Rewinding to committed_end (not to the rewritten frame) keeps the chain state
        simple; it costs one more checksum pass over the open transaction's frames,
        which happens only when SQLite rewrites spilled frames.
        """
        self.reject()

    def _touches_commit_frame(self, fd: int, first_frame: int, last_frame: int) -> bool:
        fsize = self.frame_size
        for idx in range(first_frame, last_frame + 1):
            raw = os.pread(fd, WAL_FRAME_HEADER_SIZE, WAL_HEADER_SIZE + idx * fsize)
            if len(raw) == WAL_FRAME_HEADER_SIZE and int.from_bytes(raw[4:8], "big") != 0:
                return True
        return False

    def may_complete_commit(self, fd: int, offset: int, data: bytes) -> bool:
        """Would writing `data` at `offset` touch a frame whose commit field is set?

        Checked before the write (the commit field may come from `data` itself)
        so the caller can keep the bytes it overwrites.
        """
        if self.header is None or offset < WAL_HEADER_SIZE:
            return False
        fsize = self.frame_size
        end = offset + len(data)
        first = (offset - WAL_HEADER_SIZE) // fsize
        last = (end - 1 - WAL_HEADER_SIZE) // fsize
        for idx in range(first, last + 1):
            field_start = WAL_HEADER_SIZE + idx * fsize + 4
            if offset <= field_start and end >= field_start + 4:
                raw = data[field_start - offset : field_start - offset + 4]
            else:
                raw = os.pread(fd, 4, field_start)
            if len(raw) == 4 and int.from_bytes(raw, "big"):
                return True
        return False

    def accept(self, commit: WALCommit) -> None:
        """The transaction is durable as LTX: make it part of the committed log."""
        self.index.update(commit.pages)
        self.committed_end = commit.end
        self.chain = self.valid_chain
        self.pending_pages.clear()

    def reject(self) -> None:
        """The transaction could not be recorded: SQLite gets an error and will redo it."""
        self.valid_end = self.committed_end
        self.valid_chain = self.chain
        self.pending_pages.clear()

    def next_commit(self, fd: int) -> WALCommit | None:
        """Walk valid frames from the cursor up to the next valid commit frame."""
        header = self.header
        if header is None:
            return None
        fsize = self.frame_size
        big_endian = header.big_endian_checksums
        pos = self.valid_end
        chain = self.valid_chain
        while True:
            raw = os.pread(fd, fsize, pos)
            if len(raw) < fsize:
                return None
            fh = parse_frame_header(raw[:WAL_FRAME_HEADER_SIZE])
            if fh.salt1 != header.salt1 or fh.salt2 != header.salt2 or fh.pgno == 0:
                return None
            mv = memoryview(raw)
            chain = frame_checksum(
                mv[:WAL_FRAME_HEADER_SIZE],
                mv[WAL_FRAME_HEADER_SIZE:],
                chain[0],
                chain[1],
                big_endian,
            )
            if chain != (fh.checksum1, fh.checksum2):
                return None
            self.pending_pages[fh.pgno] = pos + WAL_FRAME_HEADER_SIZE
            pos += fsize
            self.valid_end = pos
            self.valid_chain = chain
            if fh.commit:
                return WALCommit(
                    start=self.committed_end,
                    end=pos,
                    commit=fh.commit,
                    pages=dict(self.pending_pages),
                    salt1=header.salt1,
                    salt2=header.salt2,
                )
