"""The FUSE Operations: thin handlers that delegate to the store.

Handlers never raise anything but FUSEError (any other exception would end
pyfuse3's main loop and the mount): `fuse_request` (fuse/boundary.py) is the
one boundary that maps domain errors to errno, logging unexpected ones.

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
import stat
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pyfuse3

from litefspy.errors import DatabaseError, NotFoundError, NotReplicatedError, ReadOnlyError
from litefspy.fuse.attrs import (
    CACHE_TIMEOUT,
    ROOT,
    Attributes,
    ClusterView,
    StandaloneCluster,
    negative,
    set_local_attrs,
)
from litefspy.fuse.boundary import Observer, fuse_request
from litefspy.fuse.copies import (
    Copies,
    StagedCopy,
    is_copy_open,
    is_staging_name,
    refuse_sidecar_copy,
)
from litefspy.fuse.handles import Handle, HandleTable, file_info, open_backing, wants_write
from litefspy.fuse.inodes import InodeTable, Local, Node, Special, mount_name, parse_name
from litefspy.fuse.invalidate import SIDECARS, KernelCache
from litefspy.fuse.listing import root_listing
from litefspy.logs import kv
from litefspy.store.database import Database
from litefspy.store.files import valid_database_name
from litefspy.store.store import Store
from litefspy.store.types import FileKind

log = logging.getLogger(__name__)

__all__ = ["CACHE_TIMEOUT", "ClusterView", "Operations", "StandaloneCluster"]

# A "not replicated yet" warning for one database name at most this often.
NOT_REPLICATED_LOG_INTERVAL = 10.0


def _entry_name(ops: Operations, args: tuple[object, ...]) -> str:
    """The name a lookup/create/unlink request is about (for its log line)."""
    return os.fsdecode(args[1])  # type: ignore[arg-type]


def _inode_name(ops: Operations, args: tuple[object, ...]) -> str:
    node = ops.inodes.get(args[0])  # type: ignore[arg-type]
    return str(args[0]) if node is None else mount_name(node.name, node.kind)


def _handle_name(ops: Operations, args: tuple[object, ...]) -> str:
    return ops.handles[args[0]].node.name  # type: ignore[index]


def _handle_mount_name(ops: Operations, args: tuple[object, ...]) -> str:
    node = ops.handles[args[0]].node  # type: ignore[index]
    return mount_name(node.name, node.kind)


class Operations(pyfuse3.Operations):
    """Passthrough of every database file to `<data>/dbs/NAME/`, with commit capture.

    Every handler is a `fuse_request` (fuse/boundary.py: errno mapping, request
    counts, timing); attributes live in `fuse/attrs.py`, open files in
    `fuse/handles.py`, files copied in with cp/rsync in `fuse/copies.py`.
    """

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
        self.handles = HandleTable()
        self._dir_listing: list[tuple[bytes, pyfuse3.EntryAttributes]] | None = None
        self.request_counts: dict[str, int] = {}
        # Set by enable_timing: every handler's duration goes there (metrics).
        self.observe: Observer | None = None
        self._offline_logged: set[str] = set()
        self.attrs = Attributes(store, self.cluster, self._local_path)
        self.copies = Copies(
            store, self.inodes, self.attrs, self.invalidate_database, self.is_own_request
        )
        self.kernel = KernelCache(self.inodes, self.copies.pending)

    @property
    def mtime_refresh(self) -> float:
        """Seconds a database's new mtime may wait to show (see Attributes.shown_mtime)."""
        return self.attrs.mtime_refresh

    @mtime_refresh.setter
    def mtime_refresh(self, seconds: float) -> None:
        self.attrs.mtime_refresh = seconds

    def _local_path(self, node: Node) -> Path:
        if node.kind is Local.SUPER_JOURNAL:
            return self.store.super_journal_file(node.name)
        return self.copies.staged_path(node)

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

    def _looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of a name the kernel now holds one more reference to."""
        attrs = self.attrs.of(node)
        node.lookups += 1
        return attrs

    # ------------------------------------------------------------- lookups

    @fuse_request("lookup", _entry_name)
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        db_name, kind = parse_name(text)
        try:
            copy = self.copies.get(text)
            if copy is not None:
                found = await self.copies.lookup(copy, ctx)
                if found is not None:
                    return found
            if kind is Local.SUPER_JOURNAL:
                if not self.store.super_journal_file(text).exists():
                    return negative()
                return self._looked_up(self.inodes.node_for(db_name, kind))
            if isinstance(kind, Special):
                return self._looked_up(self.inodes.node_for(db_name, kind))
            if isinstance(kind, Local) or not valid_database_name(db_name):
                raise pyfuse3.FUSEError(errno.ENOENT)
            db = self.store.get(db_name)
            if db is None or not db.path(kind).exists():
                return negative()
            return self._looked_up(self.inodes.node_for(db_name, kind))
        except NotFoundError as exc:
            if db_name not in self._offline_logged:
                # Once per database: applications retry lookups in a loop.
                self._offline_logged.add(db_name)
                log.error("lookup of offline database %s: %s", text, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @fuse_request("forget", counted=False, timed=False)
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @fuse_request("getattr", lambda _ops, args: str(args[0]))
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self.attrs.root()
        return self.attrs.of(self._node(inode))

    @fuse_request("setattr", _inode_name)
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._node(inode)
        if isinstance(node.kind, Special):
            raise pyfuse3.FUSEError(errno.EPERM)
        handle = self.handles.get(fh) if fh is not None else None
        if isinstance(node.kind, Local) or (handle is not None and handle.copy is not None):
            path = handle.copy.path if handle and handle.copy else self._local_path(node)
            set_local_attrs(path, attr, fields)
            return self.attrs.of(node)
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
        return self.attrs.of(node)

    # ---------------------------------------------------------- open/create

    @fuse_request("open", _inode_name)
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        await self.copies.await_import(node, ctx)
        if isinstance(node.kind, Special):
            if wants_write(flags):
                raise pyfuse3.FUSEError(errno.EACCES)
            content = self.attrs.special_content(node)
            if content is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            fh = self.handles.add(Handle(node, None, content=content))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if isinstance(node.kind, Local):
            return self._open_local(node, flags)
        if node.kind is not FileKind.DATABASE and is_copy_open(flags):
            refuse_sidecar_copy(mount_name(node.name, node.kind))
        if node.kind is FileKind.DATABASE and flags & os.O_TRUNC and wants_write(flags):
            fd, copy = self.copies.start(mount_name(node.name, node.kind), 0o644, node)
            return pyfuse3.FileInfo(
                fh=self.handles.add(Handle(node, None, fd, copy=copy)), direct_io=True
            )
        db = self._db(node.name)
        if wants_write(flags) and not db.writable and not self.is_own_request(ctx):
            db.check_writable(node.kind, opening=True)
        fd = open_backing(db, node.kind, flags)
        if flags & os.O_TRUNC and wants_write(flags):
            try:
                await self.store.file_op(db, partial(db.truncate, node.kind, 0))
            except Exception:
                os.close(fd)
                raise
        fh = self.handles.add(Handle(node, db, fd))
        return file_info(fh, node.kind)

    def _open_local(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        writer = self.copies.open_writer(node, flags)
        if writer is not None:
            fd, copy = writer
            return pyfuse3.FileInfo(
                fh=self.handles.add(Handle(node, None, fd, copy=copy)), direct_io=True
            )
        fd = os.open(self._local_path(node), flags & ~(os.O_CREAT | os.O_EXCL))
        return pyfuse3.FileInfo(fh=self.handles.add(Handle(node, None, fd)), direct_io=True)

    def _copy_info(self, node: Node, fd: int, copy: StagedCopy) -> pyfuse3.FileInfo:
        """A writer's descriptor on a staged copy (direct I/O: no cache to keep)."""
        return pyfuse3.FileInfo(
            fh=self.handles.add(Handle(node, None, fd, copy=copy)), direct_io=True
        )

    @fuse_request("create", _entry_name)
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = os.fsdecode(name)
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        db_name, kind = parse_name(text)
        if kind is Local.SUPER_JOURNAL:
            return self._create_super_journal(text, mode, flags)
        if kind is FileKind.DATABASE and (
            is_staging_name(text) or (valid_database_name(text) and is_copy_open(flags))
        ):
            fd, copy, attrs = self.copies.create(text, mode)
            return self._copy_info(copy.node, fd, copy), attrs
        if isinstance(kind, Special | Local) or not valid_database_name(db_name):
            log.warning("create refused %s", kv(name=text, reason="not a database name"))
            raise pyfuse3.FUSEError(errno.EPERM)
        if is_copy_open(flags):
            refuse_sidecar_copy(text)
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
        attrs = self._looked_up(node)
        fh = self.handles.add(Handle(node, db, fd, created_db=new_db))
        return file_info(fh, kind), attrs

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

    def _create_super_journal(
        self, name: str, mode: int, flags: int
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """SQLite starts a multi-database commit: its bookkeeping, kept on this node."""
        path = self.store.super_journal_file(name)
        fd = os.open(path, (flags & ~os.O_ACCMODE) | os.O_RDWR | os.O_CREAT, stat.S_IMODE(mode))
        node = self.inodes.node_for(name, Local.SUPER_JOURNAL)
        try:
            attrs = self.attrs.of(node)
        except BaseException:
            os.close(fd)
            raise
        node.lookups += 1
        fh = self.handles.add(Handle(node, None, fd))
        return pyfuse3.FileInfo(fh=fh, direct_io=True), attrs

    # ------------------------------------------------------------- file I/O

    @fuse_request("read", _handle_name)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if handle.fd < 0:
            return handle.content[off : off + size]
        return os.pread(handle.fd, size, off)

    @fuse_request("write", _handle_mount_name)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if handle.copy is not None:
            return self.copies.write(handle.fd, handle.copy, off, buf)
        if handle.node.kind is Local.SUPER_JOURNAL and handle.fd >= 0:
            return os.pwrite(handle.fd, buf, off)
        db = handle.db
        if db is None or handle.fd < 0:
            raise pyfuse3.FUSEError(errno.EBADF)
        kind: FileKind = handle.node.kind  # type: ignore[assignment]
        try:
            if db.forward is None:  # the hot path: no detour through store.file_op
                return db.write(kind, handle.fd, off, buf)
            return await self.store.file_op(db, partial(db.write, kind, handle.fd, off, buf))
        except DatabaseError:
            if handle.created_db:
                handle.refused_write = True
            raise

    @fuse_request("flush")
    async def flush(self, fh: int) -> None:
        # ENOSYS tells the kernel to stop sending FLUSH at all (there is nothing to
        # flush: no writeback cache, no lock handlers). That matters when the daemon
        # is killed: FLUSH is synchronous, so closing litefspy's own descriptors on
        # its mount at exit would otherwise wait forever for the dying daemon.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_request("fsync", _handle_name)
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles[fh]
        if handle.fd < 0:
            return
        if handle.db is not None and handle.db.unsynced:
            # The application asks for durability: its LTX history first.
            handle.db.sync_pending()
        if datasync:
            os.fdatasync(handle.fd)
        else:
            os.fsync(handle.fd)

    @fuse_request("release", _handle_name)
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if handle is None:
            return
        if handle.fd >= 0:
            os.close(handle.fd)
            if handle.refused_write:
                self._drop_refused_database(handle)
        if handle.copy is not None:
            await self.copies.closed(handle.copy)

    def _drop_refused_database(self, handle: Handle) -> None:
        """The last close of a database file whose creator's write was refused."""
        name = handle.node.name
        if any(h.db is handle.db for h in self.handles):
            return  # still open elsewhere: SQLite may yet make it a database
        try:
            dropped = self.store.drop_uncommitted(name)
        except OSError as exc:
            log.error("could not remove the empty database %s: %s", kv(db=name), exc)
            return
        if dropped:
            self.kernel.retire(name, (FileKind.DATABASE, *SIDECARS))

    # ----------------------------------------------------------- namespace

    @fuse_request("unlink", _entry_name)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = os.fsdecode(name)
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        db_name, kind = parse_name(text)
        copy = self.copies.get(text)
        if copy is not None and not valid_database_name(text):
            self.copies.discard(copy)  # rsync gave up on its temp file
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
            self.kernel.retire(db_name, SIDECARS)

    async def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_request("rename", timed=False)
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
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        copy = self.copies.get(old)
        if copy is None or parent_inode_old != ROOT or parent_inode_new != ROOT or flags:
            log.warning("rename refused: litefspy databases cannot be renamed through the mount")
            raise pyfuse3.FUSEError(errno.EPERM)
        self.copies.rename(copy, old, new)

    mkdir = _refuse  # type: ignore[assignment]
    mknod = _refuse  # type: ignore[assignment]
    symlink = _refuse  # type: ignore[assignment]
    link = _refuse  # type: ignore[assignment]
    rmdir = _refuse

    @fuse_request("statfs", counted=False)
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

    @fuse_request("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """ENOSYS: the kernel then opens directories without asking (and sends no
        RELEASEDIR). SQLite opens the directory to fsync it after creating a
        journal, so that saves two requests per DELETE-mode commit. The root is
        the only directory; `readdir` lists it itself."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_request("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List the root: a fresh listing at offset 0, continued from it after.

        Without opendir (see above) there is no per-open handle to keep a listing
        in; one listing is kept from each offset-0 call for the calls that continue
        it, so a long listing does not rebuild itself per page of entries.
        """
        if start_id == 0 or self._dir_listing is None:
            self._dir_listing = root_listing(self.store, self.cluster, self.inodes, self.attrs)
        entries = self._dir_listing
        for idx in range(start_id, len(entries)):
            name, attrs = entries[idx]
            if not pyfuse3.readdir_reply(token, name, attrs, idx + 1):
                break
            node = self.inodes.get(attrs.st_ino)
            if node is not None:
                node.lookups += 1

    @fuse_request("releasedir", timed=False)
    async def releasedir(self, fh: int) -> None:
        pass  # never sent while opendir answers ENOSYS

    @fuse_request("fsyncdir")
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # SQLite syncs the directory after deleting a super-journal (the commit point).
        for directory in (self.store.dbs_dir, self.store.super_dir):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # ------------------------------------------------------------- metrics

    def enable_timing(self, observe: Observer) -> None:
        """Report every handler's duration as `observe(op, seconds)` (metrics).

        Until then no handler reads the clock, so a node without metrics pays
        nothing for it on its hot path.
        """
        self.observe = observe

    # --------------------------------------------------------- invalidation

    def invalidate_database(self, name: str, *, entries: bool = True) -> None:
        """Drop the kernel's cached pages, attributes and entries of one database.

        `entries=False` when no file of the database was created or removed (a
        replica's incremental apply): its names still lead where they did, and
        keeping them spares every reader a lookup per name after each apply.

        Must be called from a worker thread, never from the trio loop: the kernel
        may wait for in-flight requests (e.g. a read of a page being invalidated)
        that only the loop can answer.
        """
        self.kernel.invalidate(name, [*FileKind, Special.POS], entries=entries)

    def is_own_request(self, ctx: pyfuse3.RequestContext) -> bool:
        """The request comes from litefspy's lock keeper process (store/keeper.py).

        `ctx.pid` is the calling thread's id; the keeper serves each caller on
        a thread of its own.
        """
        pid = self.store.lock_keeper_pid
        return pid is not None and os.path.exists(f"/proc/{pid}/task/{ctx.pid}")
