"""Real SQLite writing into a `Store` without a mount: an apsw VFS in front of it.

The FUSE handlers translate the kernel's requests into `Database.write`,
`truncate`, `unlink` and `created`; this VFS makes the same calls from
SQLite's own file methods, so capture and recovery run against real SQLite
transactions in every journal mode in milliseconds, with no mount, no
kernel cache and no daemon.

SQLite is given the backing database file itself (`dbs/NAME/database`), so it
names its journal `database-journal` and its WAL `database-wal`; the VFS maps
those to the store's `journal` and `wal`. Reads, locks and the WAL index go to
SQLite's own unix VFS on the same files (as they go to the kernel through the
mount). Writes go through the store, on the calling thread: use one
connection per VFS at a time, as the mount serializes requests on one thread.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import apsw

from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import FileKind

SUFFIXES = {"-journal": FileKind.JOURNAL, "-wal": FileKind.WAL}


class StoreVFS(apsw.VFS):
    """Route SQLite's writes to the databases of `store` (register once per name)."""

    def __init__(self, store: Store, name: str = "litefspy-store") -> None:
        self.store = store
        self.vfs_name = name
        super().__init__(name, base="")

    def path_of(self, db_name: str) -> str:
        """What to give `apsw.Connection(path, vfs=...)` to open database `db_name`."""
        db = self.store.create(db_name)
        return str(db.path(FileKind.DATABASE))

    def connect(self, db_name: str) -> apsw.Connection:
        return apsw.Connection(self.path_of(db_name), vfs=self.vfs_name)

    def route(self, filename: str) -> tuple[Database, FileKind, Path]:
        """(database, kind, backing path) for a name SQLite uses."""
        path = Path(filename)
        for suffix, kind in SUFFIXES.items():
            if path.name == "database" + suffix:
                db = self.store.get(path.parent.name)
                assert db is not None, f"no database for {filename}"
                return db, kind, db.path(kind)
        db = self.store.get(path.parent.name)
        assert db is not None and path.name == "database", f"not a store file: {filename}"
        return db, FileKind.DATABASE, path

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
        if name is None:  # SQLite's temporary files (VACUUM, sorting): plain files
            return apsw.VFSFile("", name, flags)
        return StoreFile(self, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        db, kind, path = self.route(filename)
        if not path.exists():
            raise apsw.IOError(f"no such file: {filename}")
        db.unlink(kind)

    def xAccess(self, pathname: str, flags: int) -> bool:
        if pathname.endswith(tuple(SUFFIXES)):
            return self.route(pathname)[2].exists()
        return bool(super().xAccess(pathname, flags))


class StoreFile(apsw.VFSFile):
    """One open file: reads and locks by the unix VFS, changes through the store."""

    def __init__(self, vfs: StoreVFS, name: str | apsw.URIFilename, flags: list[int]) -> None:
        text = name.filename() if isinstance(name, apsw.URIFilename) else name
        self.db, self.kind, path = vfs.route(text)
        existed = path.exists()
        # The journal and WAL open under their backing names; the database itself
        # keeps SQLite's URI filename object (its parameters matter to SQLite).
        super().__init__("", name if self.kind is FileKind.DATABASE else str(path), flags)
        self.fd = os.open(path, os.O_RDWR)
        if not existed:
            self.db.created(self.kind)

    def xWrite(self, data: bytes, offset: int) -> None:
        view = bytes(data)
        while view:
            written = self.db.write(self.kind, self.fd, offset, view)
            view, offset = view[written:], offset + written

    def xTruncate(self, newsize: int) -> None:
        self.db.truncate(self.kind, newsize)

    def xSync(self, flags: int) -> None:
        if self.db.unsynced:
            self.db.sync_pending()  # the LTX history first, as the mount's fsync does
        os.fsync(self.fd)

    def xClose(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().xClose()


# Inserts n rows of `size` random bytes (n and b columns of table t) in one statement.
BLOBS = (
    "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < {n}) "
    "INSERT INTO t (n, b) SELECT -x, randomblob({size}) FROM s"
)


def dump(path: Path) -> list[str]:
    """The SQL dump of a database file, after checking its integrity."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return list(conn.iterdump())
    finally:
        conn.close()
