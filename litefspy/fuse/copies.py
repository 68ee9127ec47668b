"""Whole files copied into the mount outside SQLite's protocol (cp, rsync).

Such a file is staged in a temp file, never in the database file, so readers
see the old database (or no file) until the writer closes it; then it is
imported like `litefspy import` (one transaction that replicas receive), or
refused. rsync's temp file (a dot-name) may be renamed onto a database name,
which imports it; copying -journal/-wal files in is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from litefspy.errors import DatabaseError, LitefspyError, ReadOnlyError
from litefspy.fuse.attrs import Attributes, negative
from litefspy.fuse.inodes import InodeTable, Local, Node, Special
from litefspy.logs import kv
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import SQLITE_MAGIC, parse_database_header
from litefspy.store.files import valid_database_name
from litefspy.store.store import Store
from litefspy.store.types import FileKind

# The same logger as the handlers': the log lines read as they always did.
log = logging.getLogger("litefspy.fuse.ops")


@dataclass
class StagedCopy:
    """A whole file being written into the mount outside SQLite's protocol (cp, rsync).

    It is staged in a temp file, never in the database file, so readers see the
    old database (or no file) until the writer closes it; then it is imported
    like `litefspy import` (one transaction that replicas receive), or refused.
    """

    name: str  # as in the mount; rsync's temp files are dot-names, not databases
    path: Path  # the staging file under <data>/tmp/
    node: Node  # what the writer's descriptor refers to
    replaces: bool  # opened over an existing database with O_TRUNC
    writers: int = 0
    written: bool = False
    finishing: bool = False  # closed (or renamed): being imported or discarded
    refused: str | None = None
    done: trio.Event = field(default_factory=trio.Event)


class Copies:
    """The copies in progress, by their name in the mount.

    `invalidate(name)` drops the kernel's cache of a database (run in a worker
    thread); `is_own_request(ctx)` tells litefspy's own lock keeper's requests.
    """

    def __init__(
        self,
        store: Store,
        inodes: InodeTable,
        attrs: Attributes,
        invalidate: Callable[[str], None],
        is_own_request: Callable[[pyfuse3.RequestContext], bool],
    ) -> None:
        self.store = store
        self.inodes = inodes
        self.attrs = attrs
        self.invalidate = invalidate
        self.is_own_request = is_own_request
        self.pending: dict[str, StagedCopy] = {}

    def get(self, name: str) -> StagedCopy | None:
        """The copy into `name` in progress, if any."""
        return self.pending.get(name)

    def staged_path(self, node: Node) -> Path:
        """The staging file of the copy `node` refers to; FUSEError(ENOENT) if none."""
        copy = self.pending.get(node.name)
        if copy is None or copy.node is not node:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return copy.path

    async def lookup(
        self, copy: StagedCopy, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes | None:
        """A name being copied in: the staged file (rsync's temp name), or, for a
        database name, what was there before (None: look it up as usual).

        A copy into a new name that was just closed or renamed is being imported:
        lookups wait for it (`cp f mnt/x && sqlite3 mnt/x` sees the copy). Over an
        existing database they do not (the import's lock keeper looks the name up
        too, and the kernel serialises lookups of one name): opens wait instead.
        """
        if not valid_database_name(copy.name):
            attrs = self.attrs.of(copy.node)
            copy.node.lookups += 1
            return attrs
        db = self.store.get(copy.name)
        exists = db is not None and db.exists()
        if copy.finishing and not exists and not self.is_own_request(ctx):
            await copy.done.wait()
            return None
        if exists or copy.finishing:
            return None
        entry = negative()
        entry.entry_timeout = 0
        return entry

    async def await_import(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """Opens of a database (or its -pos) wait for a copy into it that was just closed.

        The kernel sends the copier's release before its close() returns, and
        requests are read in order, so `cp f mnt/x && sqlite3 mnt/x` opens the
        imported database, even through a cached name.
        """
        if isinstance(node.kind, Local) or node.kind in (Special.PRIMARY, Special.LAG):
            return
        copy = self.pending.get(node.name)
        if copy is not None and copy.finishing and not self.is_own_request(ctx):
            await copy.done.wait()

    def open_writer(self, node: Node, flags: int) -> tuple[int, StagedCopy] | None:
        """Another descriptor on a copy still being written (None: not one)."""
        copy = self.pending.get(node.name)
        if node.kind is not Local.COPY or copy is None or copy.finishing:
            return None
        fd = os.open(copy.path, flags & ~(os.O_CREAT | os.O_EXCL))
        copy.writers += 1
        return fd, copy

    def create(self, name: str, mode: int) -> tuple[int, StagedCopy, pyfuse3.EntryAttributes]:
        """A copier creates `name`: its descriptor, copy and the name's attributes."""
        db = self.store.get(name) if valid_database_name(name) else None
        node = (
            self.inodes.node_for(name, FileKind.DATABASE)
            if db is not None and db.exists()
            else self.inodes.node_for(name, Local.COPY)
        )
        fd, copy = self.start(name, mode, node)
        attrs = self.attrs.of(node)
        node.lookups += 1
        return fd, copy, attrs

    def start(self, name: str, mode: int, node: Node) -> tuple[int, StagedCopy]:
        """A copier opened `name` to write a whole file: stage it under <data>/tmp/."""
        if not self.store.writable and not self.store.accepts_writes(name):
            raise ReadOnlyError(f"cannot copy into {name}: this node is a replica")
        if name in self.pending:
            log.error("copy into %s refused: another copy into it is in progress", name)
            raise pyfuse3.FUSEError(errno.EBUSY)
        self.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = self.store.tmp_dir / f"copy.{secrets.token_hex(6)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode) or 0o644)
        copy = StagedCopy(name, path, node, replaces=node.kind is FileKind.DATABASE, writers=1)
        self.pending[name] = copy
        log.debug("copy started %s", kv(name=name, staged=path.name))
        return fd, copy

    @staticmethod
    def write(fd: int, copy: StagedCopy, off: int, buf: bytes) -> int:
        """Write into the staging file; a file that is not SQLite is refused at once."""
        if copy.refused is None and off < len(SQLITE_MAGIC):
            copy.refused = _not_sqlite(off, buf)
            if copy.refused is not None:
                log.error("copy into %s refused: %s", copy.name, copy.refused)
        if copy.refused is not None:
            raise pyfuse3.FUSEError(errno.EPERM)
        written = os.pwrite(fd, buf, off)
        copy.written = True
        return written

    async def closed(self, copy: StagedCopy) -> None:
        """One writer of `copy` closed it: the last one's close imports it."""
        copy.writers -= 1
        # rsync's temp file (not a database name) waits for its rename instead.
        if (copy.writers, copy.finishing) == (0, False) and (
            valid_database_name(copy.name) or copy.refused is not None
        ):
            await self.finish(copy)

    def rename(self, copy: StagedCopy, old: str, new: str) -> None:
        """A finished copy under a temp name (rsync) onto a database name: an import,
        run after the rename returns."""
        if not valid_database_name(new) or new in self.pending:
            log.error("rename of %s refused: %s is not a database name it can take", old, new)
            raise pyfuse3.FUSEError(errno.EPERM)
        if copy.writers or copy.finishing:
            raise pyfuse3.FUSEError(errno.EBUSY)
        del self.pending[old]
        copy.name = new
        copy.finishing = True
        db = self.store.get(new)
        copy.replaces = db is not None and db.exists()
        self.pending[new] = copy
        trio.lowlevel.spawn_system_task(self.finish, copy)

    async def finish(self, copy: StagedCopy) -> None:
        """The writer closed the copy (or renamed it onto a database name): import it.

        Never raises: it runs in `release` (whose result the kernel ignores) or
        in the background after a rename; a refusal is one line in the log.
        """
        copy.finishing = True
        try:
            await self._import(copy)
        except (LitefspyError, OSError) as exc:
            # The staging path means nothing to the person copying.
            log.error("copy into %s refused: %s", copy.name, str(exc).replace(f"{copy.path}", "it"))
            if copy.replaces:
                # The writer's kernel view of the old database (size) is stale.
                await trio.to_thread.run_sync(self.invalidate, copy.name)
        except Exception:
            log.exception("copy into %s failed", copy.name)
        finally:
            self.discard(copy)

    async def _import(self, copy: StagedCopy) -> None:
        if copy.refused is not None:
            return
        size = os.stat(copy.path).st_size
        if size == 0 and not copy.written:
            if copy.replaces:
                raise DatabaseError(
                    "an empty file would replace the database; delete it (rm) instead"
                )
            # `touch`: an empty file, which SQLite takes as an empty database.
            db = self.store.create(copy.name)
            os.close(os.open(db.db_path, os.O_WRONLY | os.O_CREAT, 0o644))
            db.created(FileKind.DATABASE)
            return
        await self.store.import_database(copy.name, copy.path)

    def discard(self, copy: StagedCopy) -> None:
        """Forget `copy` and remove its staging file."""
        if self.pending.get(copy.name) is copy:
            del self.pending[copy.name]
        copy.path.unlink(missing_ok=True)
        if copy.node.kind is Local.COPY:
            self.inodes.retire(copy.node.name, Local.COPY)
        copy.done.set()


def is_copy_open(flags: int) -> bool:
    """Opened the way file copiers do and SQLite never does (it uses O_RDWR, no
    O_TRUNC, and O_EXCL only for super-journals and temp files)."""
    return (flags & os.O_ACCMODE) == os.O_WRONLY or bool(flags & (os.O_TRUNC | os.O_EXCL))


def is_staging_name(name: str) -> bool:
    """rsync's temp files (`.NAME.XXXXXX`): staged, never databases themselves."""
    return name.startswith(".") and name not in (Special.PRIMARY.value, Special.LAG.value)


def refuse_sidecar_copy(name: str) -> None:
    """Copying a -journal or -wal file in: refused (EPERM)."""
    log.error(
        "copy into %s refused: SQLite's -journal and -wal files cannot be copied in; "
        "copy the database file instead (checkpoint a WAL database first)",
        name,
    )
    raise pyfuse3.FUSEError(errno.EPERM)


def _not_sqlite(off: int, buf: bytes) -> str | None:
    """Why the start of a copied file is not a SQLite database, or None if it may be."""
    head = buf[: len(SQLITE_MAGIC) - off]
    if head != SQLITE_MAGIC[off : off + len(head)]:
        return "not a SQLite database (no SQLite header); nothing was imported"
    if off == 0 and len(buf) >= DB_HEADER_SIZE:
        try:
            parse_database_header(buf[:DB_HEADER_SIZE])
        except LitefspyError as exc:
            return f"{exc}; nothing was imported"
    return None
