"""The FUSE Operations: thin handlers that delegate to the store.

Handlers never raise anything but FUSEError (any other exception would end
pyfuse3's main loop and the mount): `_errno` is the one boundary that maps
domain errors to errno, logging unexpected ones.

Answers for names SQLite does not use (documented in the README):
* every top-level regular file is a database; NAME-journal/-wal/-shm are its
  sidecars; NAME-pos, .primary and .lag are read-only virtual files;
* SQLite's super-journals (NAME-mjXXXXXXXXX, multi-database commits) are passed
  through to `<data>/superjournals/` and never replicated;
* a whole file written into a database name without SQLite's protocol (`cp`,
  `shutil.copy`, `rsync`: opened write-only, or with O_TRUNC or O_EXCL, which
  SQLite never uses) is staged under `<data>/tmp/` and imported as one
  transaction when its writer closes it; rsync's temp file (a dot-name) may be
  renamed onto a database name, which imports it; copying -journal/-wal files
  in is refused;
* directories, links, device nodes and other renames are refused with EPERM;
* other writes to a database file outside a transaction (`journal_mode=MEMORY/OFF`,
  writes into an existing file) are refused with EPERM and logged, because
  litefspy could not replicate them.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pyfuse3
import trio

from litefspy.errors import (
    DatabaseError,
    LitefspyError,
    NotFoundError,
    NotReplicatedError,
    ReadOnlyError,
)
from litefspy.fuse.inodes import (
    InodeTable,
    Local,
    Node,
    NodeKind,
    Special,
    mount_name,
    parse_name,
)
from litefspy.logs import kv
from litefspy.sqlite.header import HEADER_SIZE as DB_HEADER_SIZE
from litefspy.sqlite.header import parse_database_header
from litefspy.store.database import Database
from litefspy.store.files import valid_database_name
from litefspy.store.store import Store
from litefspy.store.types import FileKind, errno_for

log = logging.getLogger(__name__)

# The kernel may cache attributes, entries and absent names for this long: every
# change litefspy makes behind the kernel's back (replica apply, recovery, role
# change) invalidates explicitly (DESIGN.md decision 3).
CACHE_TIMEOUT = 3600.0
ROOT = pyfuse3.ROOT_INODE
# Seconds: how stale a database's mtime may look through the mount, to keep the
# kernel's page cache (see Operations._shown_mtime).
MTIME_REFRESH = 60.0
FileHandle = int


class ClusterView(Protocol):
    """What the virtual files need to know about the cluster."""

    def primary_hostname(self) -> str | None:
        """The primary's hostname when this node is a replica connected to it."""

    def lag_ms(self) -> int:
        """Milliseconds since the last data or heartbeat from the primary (0 on the primary)."""

    def not_ready_reason(self) -> str | None:
        """Why this node cannot serve yet (a replica that never caught up); None if it can."""


class StandaloneCluster:
    """A single node: always primary, never lagging."""

    def primary_hostname(self) -> str | None:
        return None

    def lag_ms(self) -> int:
        return 0

    def not_ready_reason(self) -> str | None:
        return None


# A "not replicated yet" warning for one database name at most this often.
NOT_REPLICATED_LOG_INTERVAL = 10.0


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


SQLITE_MAGIC = b"SQLite format 3\0"


@dataclass
class Handle:
    """An open file: the real descriptor, or the frozen content of a virtual file."""

    node: Node
    db: Database | None
    fd: int = -1
    content: bytes = b""
    copy: StagedCopy | None = None
    # This open created the database file, and a write to it was refused (not
    # SQLite): at close, the empty file is removed rather than left as a database.
    created_db: bool = False
    refused_write: bool = False


def _errno(exc: BaseException, op: str, name: str) -> pyfuse3.FUSEError:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    code = errno_for(exc)
    if isinstance(exc, ReadOnlyError):
        log.debug("%s refused: %s", op, exc)
    elif isinstance(exc, LitefspyError):
        log.error("%s failed %s: %s", op, kv(name=name), exc)
    elif isinstance(exc, OSError):
        log.debug("%s failed %s: %s", op, kv(name=name), exc)
    else:
        log.exception("unexpected error in %s %s", op, kv(name=name))
        code = errno.EIO
    return pyfuse3.FUSEError(code)


class Operations(pyfuse3.Operations):
    """Passthrough of every database file to `<data>/dbs/NAME/`, with commit capture."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Store, cluster: ClusterView | None = None) -> None:
        super().__init__()
        self.store = store
        self.cluster: ClusterView = cluster or StandaloneCluster()
        # Replica not caught up yet: databases applications asked for before they
        # arrived -> when the next "not replicated yet" warning may be logged.
        self.not_replicated: dict[str, float] = {}
        self.inodes = InodeTable()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._dir_listing: list[tuple[bytes, pyfuse3.EntryAttributes]] | None = None
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.request_counts: dict[str, int] = {}
        # A database's new mtime shows at most this often (see _shown_mtime).
        self.mtime_refresh = MTIME_REFRESH
        self._offline_logged: set[str] = set()
        # Files being copied in, by their name in the mount.
        self._copies: dict[str, StagedCopy] = {}

    def _count(self, op: str) -> None:
        self.request_counts[op] = self.request_counts.get(op, 0) + 1

    # ---------------------------------------------------------- attributes

    def _special_content(self, node: Node) -> bytes | None:
        if node.kind is Special.POS:
            db = self.store.get(node.name)
            if db is None or not db.exists():
                return None
            return f"{db.pos}\n".encode()
        if node.kind is Special.PRIMARY:
            host = self.cluster.primary_hostname()
            return None if host is None else f"{host}\n".encode()
        if node.kind is Special.LAG:
            return f"{self.cluster.lag_ms():+010d}\n".encode()
        return None

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        entry.generation = 0
        if isinstance(node.kind, Special):
            content = self._special_content(node)
            if content is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            now = time.time_ns()
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_size = len(content)
            entry.st_nlink = 1
            entry.st_uid, entry.st_gid = self.uid, self.gid
            entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = now
            entry.st_blksize = 4096
            entry.attr_timeout = entry.entry_timeout = 0
            return entry
        if isinstance(node.kind, Local):
            return self._local_attrs(node, entry)
        db = self._db(node.name)
        st = os.stat(db.path(node.kind))
        _copy_stat(entry, st)
        entry.st_mtime_ns, timeout = self._shown_mtime(node, st.st_mtime_ns)
        entry.attr_timeout = timeout
        entry.entry_timeout = CACHE_TIMEOUT
        return entry

    def _shown_mtime(self, node: Node, mtime_ns: int) -> tuple[int, float]:
        """The mtime the mount shows, and for how long the kernel may cache it.

        The kernel drops a file's whole page cache whenever a fresh getattr shows
        another mtime than it had (FUSE's auto_inval_data, which pyfuse3 cannot
        turn off), and it asks for one after every write. A database or -shm file
        on the primary changes only through the mount, so the kernel's cache is
        already right: showing each commit's mtime would only throw it away. So a
        new mtime shows at most once per `mtime_refresh` seconds (the kernel is
        told to ask again when it is due), and at once whenever litefspy changes
        the file behind the kernel's back (`invalidate_database`: the cache is
        dropped anyway). Journal and WAL use direct I/O: no cache to keep, their
        mtime is always true.
        """
        if node.kind not in (FileKind.DATABASE, FileKind.SHM):
            return mtime_ns, CACHE_TIMEOUT
        now = time.monotonic()
        if node.shown_mtime_ns is None or (
            mtime_ns != node.shown_mtime_ns and now - node.shown_at >= self.mtime_refresh
        ):
            node.shown_mtime_ns, node.shown_at = mtime_ns, now
        if node.shown_mtime_ns == mtime_ns:
            return mtime_ns, CACHE_TIMEOUT
        return node.shown_mtime_ns, max(0.1, node.shown_at + self.mtime_refresh - now)

    def _local_path(self, node: Node) -> Path:
        if node.kind is Local.SUPER_JOURNAL:
            return self.store.super_journal_file(node.name)
        copy = self._copies.get(node.name)
        if copy is None or copy.node is not node:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return copy.path

    def _local_attrs(self, node: Node, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        _copy_stat(entry, os.stat(self._local_path(node)))
        # A copy changes name or disappears when it is imported: never cached.
        timeout = CACHE_TIMEOUT if node.kind is Local.SUPER_JOURNAL else 0
        entry.attr_timeout = entry.entry_timeout = timeout
        return entry

    def _db(self, name: str) -> Database:
        db = self.store.get(name)
        if db is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return db

    def _node(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @staticmethod
    def _negative() -> pyfuse3.EntryAttributes:
        """A cacheable "no such name": SQLite probes -journal/-wal on every read."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0
        entry.entry_timeout = CACHE_TIMEOUT
        return entry

    # ------------------------------------------------------------- lookups

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._count("lookup")
        text = os.fsdecode(name)
        try:
            if parent_inode != ROOT:
                raise pyfuse3.FUSEError(errno.ENOENT)
            db_name, kind = parse_name(text)
            copy = self._copies.get(text)
            if copy is not None:
                found = await self._lookup_copy(copy, ctx)
                if found is not None:
                    return found
            if kind is Local.SUPER_JOURNAL:
                if not self.store.super_journal_file(text).exists():
                    return self._negative()
                node = self.inodes.node_for(db_name, kind)
                attrs = self._attrs(node)
                node.lookups += 1
                return attrs
            if isinstance(kind, Special):
                node = self.inodes.node_for(db_name, kind)
                attrs = self._attrs(node)
                node.lookups += 1
                return attrs
            if isinstance(kind, Local) or not valid_database_name(db_name):
                raise pyfuse3.FUSEError(errno.ENOENT)
            db = self.store.get(db_name)
            if db is None or not db.path(kind).exists():
                return self._negative()
            node = self.inodes.node_for(db_name, kind)
            attrs = self._attrs(node)
            node.lookups += 1
            return attrs
        except NotFoundError as exc:
            if db_name not in self._offline_logged:
                # Once per database: applications retry lookups in a loop.
                self._offline_logged.add(db_name)
                log.error("lookup of offline database %s: %s", text, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            raise _errno(exc, "lookup", text) from None

    async def _lookup_copy(
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
            attrs = self._attrs(copy.node)
            copy.node.lookups += 1
            return attrs
        db = self.store.get(copy.name)
        exists = db is not None and db.exists()
        if copy.finishing and not exists and not self.is_own_request(ctx):
            await copy.done.wait()
            return None
        if exists or copy.finishing:
            return None
        entry = self._negative()
        entry.entry_timeout = 0
        return entry

    async def _await_import(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """Opens of a database (or its -pos) wait for a copy into it that was just closed.

        The kernel sends the copier's release before its close() returns, and
        requests are read in order, so `cp f mnt/x && sqlite3 mnt/x` opens the
        imported database, even through a cached name.
        """
        if isinstance(node.kind, Local) or node.kind in (Special.PRIMARY, Special.LAG):
            return
        copy = self._copies.get(node.name)
        if copy is not None and copy.finishing and not self.is_own_request(ctx):
            await copy.done.wait()

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._count("getattr")
        if inode == ROOT:
            return self._root_attrs()
        try:
            return self._attrs(self._node(inode))
        except Exception as exc:
            raise _errno(exc, "getattr", str(inode)) from None

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        st = os.stat(self.store.dbs_dir)
        entry.st_ino = ROOT
        entry.st_mode = stat.S_IFDIR | 0o755
        entry.st_nlink = 2
        entry.st_uid, entry.st_gid = self.uid, self.gid
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        entry.st_blksize = 4096
        entry.attr_timeout = 1.0
        return entry

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._count("setattr")
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._node(inode)
        try:
            if isinstance(node.kind, Special):
                raise pyfuse3.FUSEError(errno.EPERM)
            handle = self._handles.get(fh) if fh is not None else None
            if isinstance(node.kind, Local) or (handle is not None and handle.copy is not None):
                path = handle.copy.path if handle and handle.copy else self._local_path(node)
                self._set_local_attrs(path, attr, fields)
                return self._attrs(node)
            db = self._db(node.name)
            path = db.path(node.kind)
            if fields.update_size:
                await self.store.file_op(db, partial(db.truncate, node.kind, attr.st_size))
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                os.chown(path, uid, gid)
            if fields.update_atime or fields.update_mtime:
                st = os.stat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime))
                node.shown_mtime_ns = None  # asked for: shown at once (cache dropped)
            return self._attrs(node)
        except Exception as exc:
            raise _errno(exc, "setattr", mount_name(node.name, node.kind)) from None

    @staticmethod
    def _set_local_attrs(
        path: Path, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> None:
        """setattr of a file litefspy does not replicate: plain passthrough."""
        if fields.update_size:
            os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            st = os.stat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))

    # ---------------------------------------------------------- open/create

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @staticmethod
    def _file_info(fh: int, kind: NodeKind) -> pyfuse3.FileInfo:
        """Database and -shm: kernel page cache kept. Journal and WAL: direct I/O.

        SQLite writes a WAL frame's page (and a journal record's page) at an offset
        that is not page-aligned; through the page cache the kernel splits every
        such write into two FUSE requests. Journal and WAL are read back only by
        rollback, recovery and WAL readers' frame lookups, so bypassing the cache
        for every handle of those files costs little and saves a request per page.
        All handles of a file use the same mode, so no stale cache can arise.
        """
        if kind in (FileKind.JOURNAL, FileKind.WAL):
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @staticmethod
    def _wants_write(flags: int) -> bool:
        return (flags & os.O_ACCMODE) != os.O_RDONLY

    @staticmethod
    def _is_copy_open(flags: int) -> bool:
        """Opened the way file copiers do and SQLite never does (it uses O_RDWR, no
        O_TRUNC, and O_EXCL only for super-journals and temp files)."""
        return (flags & os.O_ACCMODE) == os.O_WRONLY or bool(flags & (os.O_TRUNC | os.O_EXCL))

    @staticmethod
    def _is_staging_name(name: str) -> bool:
        """rsync's temp files (`.NAME.XXXXXX`): staged, never databases themselves."""
        return name.startswith(".") and name not in (Special.PRIMARY.value, Special.LAG.value)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._count("open")
        node = self._node(inode)
        await self._await_import(node, ctx)
        try:
            if isinstance(node.kind, Special):
                if self._wants_write(flags):
                    raise pyfuse3.FUSEError(errno.EACCES)
                content = self._special_content(node)
                if content is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                fh = self._new_handle(Handle(node, None, content=content))
                return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
            if isinstance(node.kind, Local):
                return self._open_local(node, flags)
            if node.kind is not FileKind.DATABASE and self._is_copy_open(flags):
                self._refuse_sidecar_copy(mount_name(node.name, node.kind))
            if node.kind is FileKind.DATABASE and flags & os.O_TRUNC and self._wants_write(flags):
                return self._start_copy(mount_name(node.name, node.kind), 0o644, node)
            db = self._db(node.name)
            if self._wants_write(flags) and not db.writable and not self.is_own_request(ctx):
                db.check_writable(node.kind, opening=True)
            fd = self._open_backing(db, node.kind, flags)
            if flags & os.O_TRUNC and self._wants_write(flags):
                try:
                    await self.store.file_op(db, partial(db.truncate, node.kind, 0))
                except Exception:
                    os.close(fd)
                    raise
            fh = self._new_handle(Handle(node, db, fd))
            return self._file_info(fh, node.kind)
        except Exception as exc:
            raise _errno(exc, "open", mount_name(node.name, node.kind)) from None

    def _open_backing(self, db: Database, kind: FileKind, flags: int) -> int:
        """Open the real file behind a name the kernel believes exists.

        After a database is deleted and recreated, the kernel may still hold
        a cached entry for its old journal or WAL (litefspy removed the file;
        the entry's invalidation is asynchronous). SQLite opens those with
        O_CREAT, which the kernel drops for a cached name: create the file,
        as the same open would on a plain disk.
        """
        path = db.path(kind)
        plain = flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        try:
            return os.open(path, plain)
        except FileNotFoundError:
            sidecar = kind in (FileKind.JOURNAL, FileKind.WAL, FileKind.SHM)
            if not sidecar or not self._wants_write(flags):
                raise
        fd = os.open(path, plain | os.O_CREAT, 0o644)
        db.created(kind)
        return fd

    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._count("create")
        text = os.fsdecode(name)
        try:
            if parent_inode != ROOT:
                raise pyfuse3.FUSEError(errno.ENOENT)
            db_name, kind = parse_name(text)
            if kind is Local.SUPER_JOURNAL:
                return self._create_super_journal(text, mode, flags)
            if kind is FileKind.DATABASE and (
                self._is_staging_name(text)
                or (valid_database_name(text) and self._is_copy_open(flags))
            ):
                return self._create_copy(text, mode)
            if isinstance(kind, Special | Local) or not valid_database_name(db_name):
                log.warning("create refused %s", kv(name=text, reason="not a database name"))
                raise pyfuse3.FUSEError(errno.EPERM)
            if self._is_copy_open(flags):
                self._refuse_sidecar_copy(text)
            if (
                not self.store.accepts_writes(db_name)
                and kind in (FileKind.DATABASE, FileKind.JOURNAL)
                and not self.is_own_request(ctx)
            ):
                self._check_replicated(db_name)
                raise ReadOnlyError(f"cannot create {text}: this node is a replica")
            db = self.store.create(db_name)
            path = db.path(kind)
            new_db = kind is FileKind.DATABASE and not path.exists()
            fd = os.open(path, (flags & ~os.O_TRUNC) | os.O_CREAT, stat.S_IMODE(mode) or 0o644)
            if flags & os.O_TRUNC and os.fstat(fd).st_size > 0:
                await self.store.file_op(db, partial(db.truncate, kind, 0))
            db.created(kind)
            node = self.inodes.node_for(db_name, kind)
            attrs = self._attrs(node)
            node.lookups += 1
            fh = self._new_handle(Handle(node, db, fd, created_db=new_db))
            return self._file_info(fh, kind), attrs
        except Exception as exc:
            raise _errno(exc, "create", text) from None

    def _check_replicated(self, db_name: str) -> None:
        """A replica that never caught up refuses to make up a database it lacks.

        SQLite then reports "unable to open database file" (it says that for any
        failed open); the node's log and `litefspy status` say why.
        """
        why = self.cluster.not_ready_reason()
        if why is None or self.store.get_if_online(db_name) is not None:
            return
        now = time.monotonic()
        if now >= self.not_replicated.get(db_name, 0.0):
            self.not_replicated[db_name] = now + NOT_REPLICATED_LOG_INTERVAL
            log.warning(
                "database not replicated yet: an application opened it on this replica "
                "before the first catch-up with the primary %s: %s",
                kv(db=db_name),
                why,
            )
        raise NotReplicatedError(f"database {db_name} is not replicated yet: {why}")

    # ------------------------------------------------ files not replicated

    def _create_super_journal(
        self, name: str, mode: int, flags: int
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """SQLite starts a multi-database commit: its bookkeeping, kept on this node."""
        path = self.store.super_journal_file(name)
        fd = os.open(path, (flags & ~os.O_ACCMODE) | os.O_RDWR | os.O_CREAT, stat.S_IMODE(mode))
        node = self.inodes.node_for(name, Local.SUPER_JOURNAL)
        try:
            attrs = self._attrs(node)
        except BaseException:
            os.close(fd)
            raise
        node.lookups += 1
        fh = self._new_handle(Handle(node, None, fd))
        return pyfuse3.FileInfo(fh=fh, direct_io=True), attrs

    def _open_local(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        copy = self._copies.get(node.name)
        if node.kind is Local.COPY and copy is not None and not copy.finishing:
            fd = os.open(copy.path, flags & ~(os.O_CREAT | os.O_EXCL))
            copy.writers += 1
            fh = self._new_handle(Handle(node, None, fd, copy=copy))
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        fd = os.open(self._local_path(node), flags & ~(os.O_CREAT | os.O_EXCL))
        return pyfuse3.FileInfo(fh=self._new_handle(Handle(node, None, fd)), direct_io=True)

    @staticmethod
    def _refuse_sidecar_copy(name: str) -> None:
        log.error(
            "copy into %s refused: SQLite's -journal and -wal files cannot be copied in; "
            "copy the database file instead (checkpoint a WAL database first)",
            name,
        )
        raise pyfuse3.FUSEError(errno.EPERM)

    def _create_copy(
        self, name: str, mode: int
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        db = self.store.get(name) if valid_database_name(name) else None
        node = (
            self.inodes.node_for(name, FileKind.DATABASE)
            if db is not None and db.exists()
            else self.inodes.node_for(name, Local.COPY)
        )
        info = self._start_copy(name, mode, node)
        attrs = self._attrs(node)
        node.lookups += 1
        return info, attrs

    def _start_copy(self, name: str, mode: int, node: Node) -> pyfuse3.FileInfo:
        """A copier opened `name` to write a whole file: stage it under <data>/tmp/."""
        if not self.store.writable and not self.store.accepts_writes(name):
            raise ReadOnlyError(f"cannot copy into {name}: this node is a replica")
        if name in self._copies:
            log.error("copy into %s refused: another copy into it is in progress", name)
            raise pyfuse3.FUSEError(errno.EBUSY)
        self.store.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = self.store.tmp_dir / f"copy.{secrets.token_hex(6)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode) or 0o644)
        copy = StagedCopy(name, path, node, replaces=node.kind is FileKind.DATABASE, writers=1)
        self._copies[name] = copy
        log.debug("copy started %s", kv(name=name, staged=path.name))
        fh = self._new_handle(Handle(node, None, fd, copy=copy))
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def _write_copy(self, handle: Handle, copy: StagedCopy, off: int, buf: bytes) -> int:
        if copy.refused is None and off < len(SQLITE_MAGIC):
            copy.refused = _not_sqlite(off, buf)
            if copy.refused is not None:
                log.error("copy into %s refused: %s", copy.name, copy.refused)
        if copy.refused is not None:
            raise pyfuse3.FUSEError(errno.EPERM)
        written = os.pwrite(handle.fd, buf, off)
        copy.written = True
        return written

    async def _finish_copy(self, copy: StagedCopy) -> None:
        """The writer closed the copy (or renamed it onto a database name): import it.

        Never raises: it runs in `release` (whose result the kernel ignores) or
        in the background after a rename; a refusal is one line in the log.
        """
        copy.finishing = True
        try:
            await self._import_copy(copy)
        except (LitefspyError, OSError) as exc:
            # The staging path means nothing to the person copying.
            log.error("copy into %s refused: %s", copy.name, str(exc).replace(f"{copy.path}", "it"))
            if copy.replaces:
                # The writer's kernel view of the old database (size) is stale.
                await trio.to_thread.run_sync(self.invalidate_database, copy.name)
        except Exception:
            log.exception("copy into %s failed", copy.name)
        finally:
            self._discard_copy(copy)

    async def _import_copy(self, copy: StagedCopy) -> None:
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

    def _discard_copy(self, copy: StagedCopy) -> None:
        if self._copies.get(copy.name) is copy:
            del self._copies[copy.name]
        copy.path.unlink(missing_ok=True)
        if copy.node.kind is Local.COPY:
            self.inodes.retire(copy.node.name, Local.COPY)
        copy.done.set()

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._count("read")
        handle = self._handle(fh)
        if handle.fd < 0:
            return handle.content[off : off + size]
        try:
            return os.pread(handle.fd, size, off)
        except OSError as exc:
            raise _errno(exc, "read", handle.node.name) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._count("write")
        handle = self._handle(fh)
        if handle.copy is not None:
            return self._write_copy(handle, handle.copy, off, buf)
        if handle.node.kind is Local.SUPER_JOURNAL and handle.fd >= 0:
            try:
                return os.pwrite(handle.fd, buf, off)
            except OSError as exc:
                raise _errno(exc, "write", handle.node.name) from None
        if handle.db is None or handle.fd < 0:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            db = handle.db
            kind: FileKind = handle.node.kind  # type: ignore[assignment]
            if db.forward is None:  # the hot path: no detour through store.file_op
                return db.write(kind, handle.fd, off, buf)
            return await self.store.file_op(db, partial(db.write, kind, handle.fd, off, buf))
        except Exception as exc:
            if handle.created_db and isinstance(exc, DatabaseError):
                handle.refused_write = True
            raise _errno(exc, "write", mount_name(handle.node.name, handle.node.kind)) from None

    async def flush(self, fh: int) -> None:
        # ENOSYS tells the kernel to stop sending FLUSH at all (there is nothing to
        # flush: no writeback cache, no lock handlers). That matters when the daemon
        # is killed: FLUSH is synchronous, so closing litefspy's own descriptors on
        # its mount at exit would otherwise wait forever for the dying daemon.
        self._count("flush")
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._count("fsync")
        handle = self._handle(fh)
        if handle.fd < 0:
            return
        try:
            if handle.db is not None and handle.db.unsynced:
                # The application asks for durability: its LTX history first.
                handle.db.sync_pending()
            if datasync:
                os.fdatasync(handle.fd)
            else:
                os.fsync(handle.fd)
        except OSError as exc:
            raise _errno(exc, "fsync", handle.node.name) from None

    async def release(self, fh: int) -> None:
        self._count("release")
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.fd >= 0:
            os.close(handle.fd)
            if handle.refused_write:
                self._drop_refused_database(handle)
        copy = handle.copy if handle is not None else None
        if copy is None:
            return
        copy.writers -= 1
        # rsync's temp file (not a database name) waits for its rename instead.
        if (copy.writers, copy.finishing) == (0, False) and (
            valid_database_name(copy.name) or copy.refused is not None
        ):
            await self._finish_copy(copy)

    def _drop_refused_database(self, handle: Handle) -> None:
        """The last close of a database file whose creator's write was refused."""
        name = handle.node.name
        if any(h.db is handle.db for h in self._handles.values()):
            return  # still open elsewhere: SQLite may yet make it a database
        try:
            dropped = self.store.drop_uncommitted(name)
        except OSError as exc:
            log.error("could not remove the empty database %s: %s", kv(db=name), exc)
            return
        if not dropped:
            return
        for kind in (FileKind.DATABASE, FileKind.JOURNAL, FileKind.WAL, FileKind.SHM, Special.POS):
            self.inodes.retire(name, kind)
            pyfuse3.invalidate_entry_async(
                ROOT, os.fsencode(mount_name(name, kind)), ignore_enoent=True
            )

    # ----------------------------------------------------------- namespace

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._count("unlink")
        text = os.fsdecode(name)
        try:
            if parent_inode != ROOT:
                raise pyfuse3.FUSEError(errno.ENOENT)
            db_name, kind = parse_name(text)
            copy = self._copies.get(text)
            if copy is not None and not valid_database_name(text):
                self._discard_copy(copy)  # rsync gave up on its temp file
                return
            if kind is Local.SUPER_JOURNAL:
                # SQLite deletes the super-journal to commit: pass it through, durably.
                os.unlink(self.store.super_journal_file(text))
                self.inodes.retire(text, kind)
                return
            if isinstance(kind, Special | Local):
                raise pyfuse3.FUSEError(errno.EPERM)
            db = self._db(db_name)
            if not db.path(kind).exists():
                raise pyfuse3.FUSEError(errno.ENOENT)
            await self.store.file_op(db, partial(db.unlink, kind))
            self.inodes.retire(db_name, kind)
            if kind is FileKind.DATABASE:
                # Deleting a database removes its sidecars too, behind the kernel's
                # back: drop their cached entries (asynchronously: the kernel holds
                # the directory while this unlink is in progress).
                for sidecar in (FileKind.JOURNAL, FileKind.WAL, FileKind.SHM, Special.POS):
                    self.inodes.retire(db_name, sidecar)
                    pyfuse3.invalidate_entry_async(
                        ROOT, os.fsencode(mount_name(db_name, sidecar)), ignore_enoent=True
                    )
        except Exception as exc:
            raise _errno(exc, "unlink", text) from None

    async def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(  # noqa: PLR0917 - pyfuse3's signature
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """Only a finished copy under a temp name (rsync) onto a database name: an import.

        The import runs after the rename returns (the kernel holds the directory
        during the rename, and the import's lock keeper must look the name up);
        meanwhile lookups of the new name wait for it, so rsync's readers never
        see a half-imported database.
        """
        self._count("rename")
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        copy = self._copies.get(old)
        if copy is None or parent_inode_old != ROOT or parent_inode_new != ROOT or flags:
            log.warning("rename refused: litefspy databases cannot be renamed through the mount")
            raise pyfuse3.FUSEError(errno.EPERM)
        if not valid_database_name(new) or new in self._copies:
            log.error("rename of %s refused: %s is not a database name it can take", old, new)
            raise pyfuse3.FUSEError(errno.EPERM)
        if copy.writers or copy.finishing:
            raise pyfuse3.FUSEError(errno.EBUSY)
        del self._copies[old]
        copy.name = new
        copy.finishing = True
        db = self.store.get(new)
        copy.replaces = db is not None and db.exists()
        self._copies[new] = copy
        trio.lowlevel.spawn_system_task(self._finish_copy, copy)

    mkdir = _refuse  # type: ignore[assignment]
    mknod = _refuse  # type: ignore[assignment]
    symlink = _refuse  # type: ignore[assignment]
    link = _refuse  # type: ignore[assignment]
    rmdir = _refuse

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store.dbs_dir)
        out = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(out, attr, getattr(st, attr))
        out.f_namemax = st.f_namemax
        return out

    # ---------------------------------------------------------- directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """ENOSYS: the kernel then opens directories without asking (and sends no
        RELEASEDIR). SQLite opens the directory to fsync it after creating a
        journal, so that saves two requests per DELETE-mode commit. The root is
        the only directory; `readdir` lists it itself."""
        self._count("opendir")
        raise pyfuse3.FUSEError(errno.ENOSYS)

    def _listing(self) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """The root directory's entries with their attributes, in a stable order."""
        entries: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
        names: list[tuple[str, NodeKind]] = []
        for db in self.store.databases():
            for file_kind in FileKind:
                if db.path(file_kind).exists():
                    names.append((db.name, file_kind))
            if db.exists():
                names.append((db.name, Special.POS))
        for entry in sorted(os.listdir(self.store.super_dir)):
            names.append((entry, Local.SUPER_JOURNAL))
        if self.cluster.primary_hostname() is not None:
            names.append((Special.PRIMARY.value, Special.PRIMARY))
        names.append((Special.LAG.value, Special.LAG))
        for db_name, kind in names:
            node = self.inodes.node_for(db_name, kind)
            try:
                entries.append((os.fsencode(mount_name(db_name, kind)), self._attrs(node)))
            except (OSError, pyfuse3.FUSEError):
                continue  # vanished while listing
        return entries

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List the root: a fresh listing at offset 0, continued from it after.

        Without opendir (see above) there is no per-open handle to keep a listing
        in; one listing is kept from each offset-0 call for the calls that continue
        it, so a long listing does not rebuild itself per page of entries.
        """
        self._count("readdir")
        if start_id == 0 or self._dir_listing is None:
            self._dir_listing = self._listing()
        entries = self._dir_listing
        for idx in range(start_id, len(entries)):
            name, attrs = entries[idx]
            if not pyfuse3.readdir_reply(token, name, attrs, idx + 1):
                break
            node = self.inodes.get(attrs.st_ino)
            if node is not None:
                node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self._count("releasedir")  # never sent while opendir answers ENOSYS

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._count("fsyncdir")
        # SQLite syncs the directory after deleting a super-journal (the commit point).
        for directory in (self.store.dbs_dir, self.store.super_dir):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # ------------------------------------------------------------- metrics

    TIMED_HANDLERS = (
        "lookup",
        "getattr",
        "setattr",
        "open",
        "create",
        "read",
        "write",
        "flush",
        "fsync",
        "release",
        "unlink",
        "opendir",
        "readdir",
        "fsyncdir",
        "statfs",
    )

    def enable_timing(self, observe: Callable[[str, float], None]) -> None:
        """Report every handler's duration as `observe(op, seconds)` (metrics).

        The handlers are wrapped on this instance only when asked, so a node
        without metrics pays nothing on its hot path.
        """
        for op in self.TIMED_HANDLERS:
            handler = getattr(self, op)

            def timed(*args: Any, _op: str = op, _h: Any = handler) -> Any:
                return _time(_op, _h(*args), observe)

            setattr(self, op, timed)

    # --------------------------------------------------------- invalidation

    def invalidate_database(self, name: str) -> None:
        """Drop the kernel's cached pages, attributes and entries of one database.

        Must be called from a worker thread, never from the trio loop: the kernel
        may wait for in-flight requests (e.g. a read of a page being invalidated)
        that only the loop can answer.
        """
        self._invalidate_files(name, [*FileKind, Special.POS])

    def _invalidate_files(self, name: str, kinds: list[NodeKind]) -> None:
        # A copy being imported may have lookups of its name waiting for it, which
        # hold the directory: its entries are invalidated without waiting for them.
        importing = name in self._copies
        for kind in kinds:
            node = self.inodes.current(name, kind)
            if node is not None:
                node.shown_mtime_ns = None  # the file changed: show its true mtime
                _quietly(lambda n=node: pyfuse3.invalidate_inode(n.ino))  # type: ignore[misc]
            entry = os.fsencode(mount_name(name, kind))
            if importing:
                pyfuse3.invalidate_entry_async(ROOT, entry, ignore_enoent=True)
            else:
                _quietly(lambda e=entry: pyfuse3.invalidate_entry(ROOT, e))  # type: ignore[misc]

    def is_own_request(self, ctx: pyfuse3.RequestContext) -> bool:
        """The request comes from litefspy's lock keeper process (store/keeper.py).

        `ctx.pid` is the calling thread's id; the keeper serves each caller on
        a thread of its own.
        """
        pid = self.store.lock_keeper_pid
        return pid is not None and os.path.exists(f"/proc/{pid}/task/{ctx.pid}")


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


def _copy_stat(entry: pyfuse3.EntryAttributes, st: os.stat_result) -> None:
    """The attributes of the real file behind a name (one link; mtime as is)."""
    entry.st_mode = st.st_mode
    entry.st_nlink = 1
    entry.st_uid, entry.st_gid = st.st_uid, st.st_gid
    entry.st_size = st.st_size
    entry.st_blksize = st.st_blksize
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns


async def _time(op: str, call: Any, observe: Callable[[str, float], None]) -> Any:
    start = time.perf_counter()
    try:
        return await call
    finally:
        observe(op, time.perf_counter() - start)


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError as exc:
        # ENOENT: the kernel had nothing cached, which is fine.
        if exc.errno != errno.ENOENT:
            log.debug("kernel cache invalidation failed: %s", exc)
