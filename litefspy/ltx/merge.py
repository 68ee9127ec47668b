"""Merge contiguous LTX files into one file covering their whole TXID range.

Backups upload one object per sync interval and compact those into larger
ones: both are this. The result holds the newest version of every page the
inputs changed (pages past the final commit dropped), the first file's
pre-apply checksum and the last file's post-apply checksum and timestamp, so
applying it is the same as applying the inputs in order. A snapshot may only
come first (the result is then a snapshot); inputs must continue each other
(TXIDs and checksums), or the merge is refused. A deletion (commit 0) drops
every page before it; a database created again after it continues from the
empty state's checksum and may have a new page size.

Pages are staged in a sparse temporary file at their database offsets, so
memory stays small whatever the size of the range.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from litefspy.errors import LTXError
from litefspy.fsutil import StrPath
from litefspy.ltx.decoder import Decoder
from litefspy.ltx.encoder import Encoder
from litefspy.ltx.format import FLAG_COMPRESS, Header, Trailer


def merge_files(
    paths: Sequence[StrPath],
    out: BinaryIO,
    *,
    compress: bool = True,
    tmp_dir: StrPath | None = None,
) -> tuple[Header, Trailer]:
    """Write the merge of `paths` (in TXID order) to `out`; return its header and trailer.

    Each input is fully verified while it is read (file checksum included).
    """
    if not paths:
        raise LTXError("merge: no LTX files given")
    present: set[int] = set()
    first: Header | None = None
    last: Header | None = None
    post = 0
    with tempfile.TemporaryFile(dir=tmp_dir) as stage:
        for path in paths:
            with open(path, "rb") as f:
                dec = Decoder(f)
                header = dec.header
                _check_continues(path, last, post, header)
                if first is None:
                    first = header
                size = header.page_size
                if header.commit == 0:
                    present.clear()  # a deletion: nothing before it survives
                for pgno, data in dec.pages():
                    os.pwrite(stage.fileno(), data, (pgno - 1) * size)
                    present.add(pgno)
                post = dec.trailer.post_apply_checksum
            last = header
        assert first is not None and last is not None
        merged = Header(
            flags=FLAG_COMPRESS if compress else 0,
            page_size=last.page_size,
            commit=last.commit,
            min_txid=first.min_txid,
            max_txid=last.max_txid,
            timestamp=last.timestamp,
            pre_apply_checksum=first.pre_apply_checksum,
            wal_offset=0,
            wal_size=0,
            wal_salt1=0,
            wal_salt2=0,
            node_id=last.node_id,
        )
        enc = Encoder(out, merged)
        size = merged.page_size
        for pgno in sorted(p for p in present if p <= merged.commit):
            enc.write_page(pgno, os.pread(stage.fileno(), size, (pgno - 1) * size))
        trailer = enc.finish(post)
    return merged, trailer


def _check_continues(path: StrPath, last: Header | None, post: int, header: Header) -> None:
    name = os.fspath(path)
    if last is None:
        return
    if header.is_snapshot:
        raise LTXError(f"merge: {name} is a snapshot; only the first file may be one")
    if header.min_txid != last.max_txid + 1:
        raise LTXError(
            f"merge: {name} starts at TXID {header.min_txid:016x}, expected "
            f"{last.max_txid + 1:016x}"
        )
    if header.pre_apply_checksum != post:
        raise LTXError(
            f"merge: {name} pre-apply checksum {header.pre_apply_checksum:016x} does not "
            f"continue {post:016x}"
        )
    if header.page_size != last.page_size and last.commit != 0:
        raise LTXError(f"merge: {name} changes the page size (needs a snapshot)")
