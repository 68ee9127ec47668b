"""What the mount shows of a file: its attributes, the content of the virtual
files (NAME-pos, .primary, .lag), and how long the kernel may cache them."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pyfuse3

from litefspy.fuse.inodes import Local, Node, Special
from litefspy.store.store import Store
from litefspy.store.types import FileKind

# The kernel may cache attributes, entries and absent names for this long: every
# change litefspy makes behind the kernel's back (replica apply, recovery, role
# change) invalidates explicitly (DESIGN.md decision 3).
CACHE_TIMEOUT = 3600.0
ROOT = pyfuse3.ROOT_INODE
# Seconds: how stale a database's mtime may look through the mount, to keep the
# kernel's page cache (see Attributes.shown_mtime).
MTIME_REFRESH = 60.0


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


class Attributes:
    """The attributes of every name in the mount.

    `local_path` finds the real file of a name litefspy does not replicate (a
    super-journal, a copy being staged); it raises FUSEError(ENOENT) if none.
    """

    def __init__(
        self, store: Store, cluster: ClusterView, local_path: Callable[[Node], Path]
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.local_path = local_path
        self.uid = os.getuid()
        self.gid = os.getgid()
        # A database's new mtime shows at most this often (see shown_mtime).
        self.mtime_refresh = MTIME_REFRESH

    def special_content(self, node: Node) -> bytes | None:
        """The content of a virtual file, or None where it does not exist."""
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

    def of(self, node: Node) -> pyfuse3.EntryAttributes:
        """The attributes of `node` (FUSEError(ENOENT) if it has no file)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        entry.generation = 0
        if isinstance(node.kind, Special):
            content = self.special_content(node)
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
            return self._local(node, entry)
        db = self.store.get(node.name)
        if db is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        st = os.stat(db.path(node.kind))
        copy_stat(entry, st)
        entry.st_mtime_ns, timeout = self.shown_mtime(node, st.st_mtime_ns)
        entry.attr_timeout = timeout
        entry.entry_timeout = CACHE_TIMEOUT
        return entry

    def shown_mtime(self, node: Node, mtime_ns: int) -> tuple[int, float]:
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

    def _local(self, node: Node, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        copy_stat(entry, os.stat(self.local_path(node)))
        # A copy changes name or disappears when it is imported: never cached.
        timeout = CACHE_TIMEOUT if node.kind is Local.SUPER_JOURNAL else 0
        entry.attr_timeout = entry.entry_timeout = timeout
        return entry

    def root(self) -> pyfuse3.EntryAttributes:
        """The mount's root directory."""
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


def negative() -> pyfuse3.EntryAttributes:
    """A cacheable "no such name": SQLite probes -journal/-wal on every read."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = CACHE_TIMEOUT
    return entry


def copy_stat(entry: pyfuse3.EntryAttributes, st: os.stat_result) -> None:
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


def set_local_attrs(
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
