"""Where a node's files are and what they may be called.

Layout of `<data>/`: `id` (the node id), `dbs/NAME/` per database (see
`database.py`) with `ltx/` holding one LTX file per transaction.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
from pathlib import Path

from litefspy.errors import DatabaseError, LTXError, SQLiteFormatError
from litefspy.fsutil import atomic_write
from litefspy.ltx.format import parse_filename
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import parse_database_header
from litefspy.sqlite.journal import super_journal_main

# Exists while litefspy writes the newest LTX file's pages into the database.
APPLY_MARKER = ".applying"
# The position written at a clean stop (see recovery.write_clean_record).
CLEAN_RECORD = "clean"
# Names the mount accepts as databases: no path separators, no sidecar suffixes,
# nothing hidden (dot-names are litefspy's own special files).
_NAME_RE = re.compile(r"^[^/\x00.][^/\x00]{0,200}$")
SIDECAR_SUFFIXES = ("-journal", "-wal", "-shm", "-pos")


def valid_database_name(name: str) -> bool:
    """True if `name` can be a database inside the mount."""
    return (
        bool(_NAME_RE.match(name))
        and not name.endswith(SIDECAR_SUFFIXES)
        and not is_super_journal_name(name)
    )


def is_super_journal_name(name: str) -> bool:
    """True if `name` is one SQLite gives the super-journal of a multi-database commit."""
    main = super_journal_main(name)
    return main is not None and bool(_NAME_RE.match(main))


def load_node_id(data_dir: Path) -> int:
    """The node's persistent 64-bit id (LTX node ID field), created on first start."""
    path = data_dir / "id"
    try:
        text = path.read_text().strip()
        value = int(text, 16)
        if value > 0:
            return value
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise DatabaseError(
            f"{path} is corrupt ({text!r}); delete it to get a new node id"
        ) from exc
    value = secrets.randbits(63) | 1
    with atomic_write(path) as f:
        f.write(f"{value:016X}\n".encode())
    return value


def validate_sqlite_file(path: Path) -> tuple[int, int]:
    """(page size, page count) of a valid SQLite database file, or a clear error."""
    try:
        with open(path, "rb") as f:
            header = parse_database_header(f.read(DB_HEADER_SIZE))
    except FileNotFoundError as exc:
        raise DatabaseError(f"{path}: no such file") from exc
    except SQLiteFormatError as exc:
        raise DatabaseError(f"{path}: {exc}") from exc
    size = path.stat().st_size
    if size == 0 or size % header.page_size:
        raise DatabaseError(
            f"{path} is {size} bytes, not a whole number of {header.page_size}-byte pages "
            "(truncated or not a SQLite database)"
        )
    pages = size // header.page_size
    if header.page_count_valid and header.page_count > pages:
        raise DatabaseError(
            f"{path} is incomplete: its header says {header.page_count} pages, the file "
            f"has {pages} (a copy cut short?)"
        )
    if Path(f"{path}-wal").exists() and Path(f"{path}-wal").stat().st_size > 0:
        raise DatabaseError(f"{path} has a non-empty -wal file; checkpoint it before importing")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"{path} failed to open as SQLite: {exc}") from exc
    if result != [("ok",)]:
        detail = "; ".join(str(r[0]) for r in result[:3])
        raise DatabaseError(f"{path} failed PRAGMA integrity_check: {detail}")
    return header.page_size, size // header.page_size


def read_page_size(path: Path) -> int:
    """The page size in a database file's header, 0 if it has none."""
    try:
        with open(path, "rb") as f:
            return parse_database_header(f.read(DB_HEADER_SIZE)).page_size
    except (OSError, SQLiteFormatError):
        return 0


def list_ltx_files(ltx_dir: Path) -> list[tuple[int, int, Path]]:
    """(min, max, path) of every LTX file in `ltx_dir`, oldest first."""
    out = []
    try:
        names = os.listdir(ltx_dir)
    except FileNotFoundError:
        return []
    for fname in names:
        if not fname.endswith(".ltx"):
            continue
        try:
            lo, hi = parse_filename(fname)
        except LTXError:
            continue
        out.append((lo, hi, ltx_dir / fname))
    # Newest last: by max TXID; a snapshot (min 1) covering the same TXID as an
    # incremental file sorts after it (it replaced that history).
    out.sort(key=lambda t: (t[1], -t[0]))
    return out
