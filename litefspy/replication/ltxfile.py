"""Reading just the header and trailer of an LTX file, and sending a file as chunks.

The primary decides what to send from the first 100 and last 16 bytes of a file
(TXID range, pre-apply and post-apply checksums), never by decoding the body:
the replica verifies every file completely before applying it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

from litefspy.errors import LTXError
from litefspy.ltx.format import HEADER_SIZE, TRAILER_SIZE, Header, Trailer
from litefspy.ltx.peek import ends_of

# Size of one LTXChunk's data: big enough that per-frame overhead (a trip
# through the gRPC bridge) vanishes, small enough to stay far below gRPC's
# message limit and to keep a few frames in flight without much memory.
CHUNK_SIZE = 512 * 1024


@dataclass(frozen=True)
class OpenLTX:
    """An LTX file opened for sending. The open descriptor keeps it readable even
    if retention deletes the name meanwhile. (A commit sent from the memory it
    was captured in has a `BytesIO` for `file`.)"""

    file: BinaryIO
    size: int
    header: Header
    trailer: Trailer
    # The first chunk, read when opening (one thread hop for a small file);
    # the file position is right after it.
    head: bytes

    def close(self) -> None:
        self.file.close()


def open_ltx(path: os.PathLike[str] | str, chunk_size: int = CHUNK_SIZE) -> OpenLTX:
    """Open an LTX file, read its header, trailer and first chunk (FileNotFoundError if gone)."""
    f = open(path, "rb")  # noqa: SIM115 - owned by the returned OpenLTX
    try:
        size = os.fstat(f.fileno()).st_size
        header, trailer = ends_of(f.fileno(), size, path)
        head = f.read(chunk_size)
    except BaseException:
        f.close()
        raise
    return OpenLTX(f, size, header, trailer, head)


def open_bytes(data: bytes, chunk_size: int = CHUNK_SIZE) -> OpenLTX:
    """An LTX file held in memory (a commit as captured), ready to send like `open_ltx`."""
    if len(data) < HEADER_SIZE + TRAILER_SIZE:
        raise LTXError(f"truncated LTX file in memory ({len(data)} bytes)")
    header = Header.decode(data[:HEADER_SIZE])
    trailer = Trailer.decode(data[-TRAILER_SIZE:])
    trailer.validate(header.commit)
    head = data[:chunk_size]
    f = io.BytesIO(data)
    f.seek(len(head))
    return OpenLTX(f, len(data), header, trailer, head)
