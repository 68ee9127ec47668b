"""What litefspy set aside instead of deleting: find it, measure it, remove it.

A replica whose history diverged from the primary's keeps its own LTX files
and database copy under `<data>/dbs/NAME/aside-<unix ms>/`; recovery keeps WAL
frames no LTX file captured as `<data>/dbs/NAME/wal.aside-<unix s>`. Nothing
reads them again: they are there for a person to inspect, and `litefspy aside
prune` removes them. Safe while the node runs (it never touches them after
creating them), except for one still being written: entries younger than
`MIN_PRUNE_AGE` are never pruned.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from litefspy.fsutil import fsync_dir

_DIR_RE = re.compile(r"aside-(\d+)")
_WAL_RE = re.compile(r"wal\.aside-(\d+)")
# An aside this young may still be being filled by the node.
MIN_PRUNE_AGE = 60.0


@dataclass(frozen=True)
class Aside:
    """One set-aside directory or WAL file."""

    db: str
    kind: str  # "history" (aside-<ms>/) or "wal" (wal.aside-<s>)
    path: Path
    created: float  # Unix seconds
    size: int  # bytes

    def age(self, now: float | None = None) -> float:
        """Seconds since it was set aside."""
        return max(0.0, (time.time() if now is None else now) - self.created)


def find_asides(data_dir: Path, db: str | None = None) -> list[Aside]:
    """Every aside under `data_dir`, oldest first (only `db`'s if given)."""
    dbs = data_dir / "dbs"
    try:
        names = sorted(os.listdir(dbs)) if db is None else [db]
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            entries = os.listdir(dbs / name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            path = dbs / name / entry
            if match := _DIR_RE.fullmatch(entry):
                if path.is_dir():
                    out.append(Aside(name, "history", path, int(match[1]) / 1000, _size(path)))
            elif (match := _WAL_RE.fullmatch(entry)) and path.is_file():
                out.append(Aside(name, "wal", path, float(match[1]), _size(path)))
    out.sort(key=lambda a: (a.created, a.db, a.path.name))
    return out


def remove_aside(aside: Aside) -> None:
    """Delete one aside (durably: its database directory is fsynced)."""
    if aside.kind == "history":
        shutil.rmtree(aside.path)
    else:
        aside.path.unlink()
    fsync_dir(aside.path.parent)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                continue
    return total
