"""All databases of one node: discovery, recovery, role, and commit notification."""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from litefspy.errors import DatabaseError, NotFoundError, RecoveryError
from litefspy.logs import kv
from litefspy.store.database import CommitInfo, Database, fsync_dir

log = logging.getLogger(__name__)

# Names the mount accepts as databases: no path separators, no sidecar suffixes,
# nothing hidden (dot-names are litefspy's own special files).
_NAME_RE = re.compile(r"^[^/\x00.][^/\x00]{0,200}$")
SIDECAR_SUFFIXES = ("-journal", "-wal", "-shm", "-pos")


def valid_database_name(name: str) -> bool:
    """True if `name` can be a database inside the mount."""
    return bool(_NAME_RE.match(name)) and not name.endswith(SIDECAR_SUFFIXES)


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
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(f"{value:016X}\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(data_dir)
    return value


class Store:
    """The databases under `<data>/dbs/`, their role (writable or not) and listeners."""

    def __init__(self, data_dir: Path, *, compress: bool = True, strict_verify: bool = False):
        self.data_dir = Path(data_dir)
        self.dbs_dir = self.data_dir / "dbs"
        self.compress = compress
        self.strict_verify = strict_verify
        self.dbs_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = load_node_id(self.data_dir)
        self._dbs: dict[str, Database] = {}
        # Databases whose recovery refused to guess: name -> message. They stay offline.
        self.failed: dict[str, str] = {}
        self._listeners: list[Callable[[CommitInfo], None]] = []
        self.writable = True

    def open(self) -> None:
        """Recover every database found on disk."""
        for entry in sorted(os.listdir(self.dbs_dir)):
            if not (self.dbs_dir / entry).is_dir() or not valid_database_name(entry):
                continue
            db = self._make(entry)
            try:
                db.recover()
            except RecoveryError as exc:
                log.error("database offline: %s", exc)
                self.failed[entry] = str(exc)
                db.close()
                continue
            self._dbs[entry] = db
            log.info("database ready %s", kv(db=entry, pos=db.pos))

    def close(self) -> None:
        for db in self._dbs.values():
            db.close()

    def _make(self, name: str) -> Database:
        db = Database(
            name,
            self.dbs_dir,
            node_id=self.node_id,
            compress=self.compress,
            strict_verify=self.strict_verify,
            on_commit=self._notify,
        )
        db.writable = self.writable
        return db

    def _notify(self, info: CommitInfo) -> None:
        for listener in list(self._listeners):
            listener(info)

    def subscribe(self, listener: Callable[[CommitInfo], None]) -> Callable[[], None]:
        """Call `listener` after every new LTX file; returns an unsubscribe function.

        Listeners run inside the FUSE handler that committed, so they must only
        record the fact (e.g. set a trio.Event), never block.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def set_writable(self, writable: bool) -> None:
        """Primary (True) or replica (False)."""
        self.writable = writable
        for db in self._dbs.values():
            db.writable = writable

    def get(self, name: str) -> Database | None:
        """The database, or None if unknown. Offline databases raise NotFoundError."""
        if name in self.failed:
            raise NotFoundError(self.failed[name])
        return self._dbs.get(name)

    def create(self, name: str) -> Database:
        """Get or create a database (the application created NAME through the mount)."""
        db = self.get(name)
        if db is not None:
            return db
        if not valid_database_name(name):
            raise DatabaseError(f"invalid database name {name!r}")
        db = self._make(name)
        db.ensure_dirs()
        self._dbs[name] = db
        return db

    def databases(self) -> list[Database]:
        return [self._dbs[n] for n in sorted(self._dbs)]
