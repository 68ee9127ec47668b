"""What a clean stop leaves for the next start, so that it need not re-read the database.

Startup must know every page's checksum (commit capture keeps the database
checksum up to date page by page). Computing them means reading the whole
file: seconds per GiB, long enough for a platform health check to give up on a
large database. At a clean stop the node knows them already, so it saves them
in `dbs/NAME/clean.sums` together with what identifies the files they describe:
the database file's size, inode, mtime and ctime (ctime cannot be set back by
any tool), and the newest LTX file's name, size, inode, mtime and ctime.

The next start uses the record only if nothing could have changed since: the
record is consumed when read (a crash afterwards leaves none), recovery had
nothing to do (no hot journal, no WAL frames, no torn LTX file, no apply in
progress), both files have exactly the recorded identity, and the checksums
add up to the newest LTX file's post-apply checksum. Anything else falls back
to the full check, exactly as before.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from litefspy.errors import LTXError
from litefspy.ltx.checksum import PageChecksums, crc64

log = logging.getLogger(__name__)

CLEAN_SUMS = "clean.sums"
_VERSION = 1


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file without reading it."""

    size: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        """The file's stamp now; None if it does not exist."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class CleanSums:
    """The page checksums saved at a clean stop and the files they describe."""

    txid: int
    checksum: int
    database: FileStamp
    ltx_name: str
    ltx: FileStamp
    checksums: PageChecksums

    def ltx_unchanged(self, path: Path) -> bool:
        """`path` is the newest LTX file as it was at the clean stop."""
        return path.name == self.ltx_name and FileStamp.of(path) == self.ltx


def save(directory: Path, txid: int, checksums: PageChecksums, db: Path, ltx: Path) -> bool:
    """Write the record for a database whose file is exactly at (txid, checksums).

    False (nothing written) when a file is missing. Written to a temp name and
    renamed; not fsynced: after a power loss the record is simply absent or
    fails its checks, and the next start does the full check.
    """
    db_stamp, ltx_stamp = FileStamp.of(db), FileStamp.of(ltx)
    if db_stamp is None or ltx_stamp is None:
        return False
    body = checksums.to_bytes()
    meta = {
        "version": _VERSION,
        "txid": txid,
        "checksum": checksums.total,
        "page_size": checksums.page_size,
        "database": asdict(db_stamp),
        "ltx_name": ltx.name,
        "ltx": asdict(ltx_stamp),
        "body_crc": crc64(body),
    }
    tmp = directory / (CLEAN_SUMS + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(meta).encode() + b"\n")
        f.write(body)
    os.rename(tmp, directory / CLEAN_SUMS)
    return True


def take(directory: Path) -> CleanSums | None:
    """Read and delete the record; None when there is none or it is damaged."""
    path = directory / CLEAN_SUMS
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    finally:
        path.unlink(missing_ok=True)
    try:
        head, _, body = raw.partition(b"\n")
        meta = json.loads(head)
        if meta.get("version") != _VERSION or crc64(body) != meta["body_crc"]:
            return None
        sums = PageChecksums.from_bytes(int(meta["page_size"]), body)
        if sums.total != meta["checksum"]:
            return None
        return CleanSums(
            txid=int(meta["txid"]),
            checksum=int(meta["checksum"]),
            database=FileStamp(**meta["database"]),
            ltx_name=str(meta["ltx_name"]),
            ltx=FileStamp(**meta["ltx"]),
            checksums=sums,
        )
    except (ValueError, KeyError, TypeError, LTXError) as exc:
        log.warning("ignoring a damaged clean-stop record %s: %s", path, exc)
        return None


# ----------------------------------------------------- verified LTX files

VERIFIED = "verified.json"
# LTX files at least this large are recorded once verified (smaller ones cost
# less to verify again than to record).
VERIFIED_MIN_BYTES = 8 << 20


def note_verified(directory: Path, ltx: Path) -> None:
    """Record that `ltx` was verified in full and is durable (fsynced here).

    After a crash, startup verifies the newest LTX file again unless it is
    exactly this file, unchanged (the same name and stamp): a 1 GiB snapshot
    (an import, an adopted database, a large transaction) then costs a stat,
    not seconds of decoding, on every start after a crash. Only large files are
    recorded. Not fsynced itself: lost, the next start verifies as before.
    """
    if FileStamp.of(ltx) is None or ltx.stat().st_size < VERIFIED_MIN_BYTES:
        return
    fd = os.open(ltx, os.O_RDONLY)
    try:
        os.fsync(fd)  # durable before the record says so
    finally:
        os.close(fd)
    stamp = FileStamp.of(ltx)
    if stamp is None:
        return
    tmp = directory / (VERIFIED + ".tmp")
    tmp.write_text(json.dumps({"version": _VERSION, "name": ltx.name, "stamp": asdict(stamp)}))
    os.rename(tmp, directory / VERIFIED)


def was_verified(directory: Path, ltx: Path) -> bool:
    """Is `ltx` the file `note_verified` recorded, unchanged since?"""
    try:
        meta = json.loads((directory / VERIFIED).read_text())
        if meta.get("version") != _VERSION or meta.get("name") != ltx.name:
            return False
        return FileStamp(**meta["stamp"]) == FileStamp.of(ltx)
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a damaged verified-file record in %s: %s", directory, exc)
        return False
