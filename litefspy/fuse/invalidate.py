"""Telling the kernel that files changed behind its back (replica apply,
recovery, a database deleted with its sidecars, a copy imported)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Container

import pyfuse3

from litefspy.fuse.attrs import ROOT
from litefspy.fuse.inodes import InodeTable, NodeKind, Special, mount_name
from litefspy.store.types import FileKind

# The same logger as the handlers': the log lines read as they always did.
log = logging.getLogger("litefspy.fuse.ops")

SIDECARS: tuple[NodeKind, ...] = (FileKind.JOURNAL, FileKind.WAL, FileKind.SHM, Special.POS)


class KernelCache:
    """The kernel's cached pages, attributes and entries of the mount's names.

    `importing` holds the names a copy is being imported into (fuse/copies.py).
    """

    def __init__(self, inodes: InodeTable, importing: Container[str]) -> None:
        self.inodes = inodes
        self.importing = importing

    def invalidate(self, name: str, kinds: list[NodeKind], *, entries: bool = True) -> None:
        """Drop what the kernel caches of these files of database `name` (their
        names too, unless `entries` is False).

        From a worker thread only: the kernel may wait for in-flight requests
        that only the trio loop can answer.
        """
        # A copy being imported may have lookups of its name waiting for it, which
        # hold the directory: its entries are invalidated without waiting for them.
        importing = name in self.importing
        for kind in kinds:
            node = self.inodes.current(name, kind)
            if node is not None:
                node.shown_mtime_ns = None  # the file changed: show its true mtime
                _quietly(lambda n=node: pyfuse3.invalidate_inode(n.ino))  # type: ignore[misc]
            if not entries:
                continue
            entry = os.fsencode(mount_name(name, kind))
            if importing:
                pyfuse3.invalidate_entry_async(ROOT, entry, ignore_enoent=True)
            else:
                _quietly(lambda e=entry: pyfuse3.invalidate_entry(ROOT, e))  # type: ignore[misc]

    def retire(self, name: str, kinds: tuple[NodeKind, ...]) -> None:
        """These names were removed: forget their inodes and drop their entries
        (asynchronously: the kernel may hold the directory meanwhile)."""
        for kind in kinds:
            self.inodes.retire(name, kind)
            pyfuse3.invalidate_entry_async(
                ROOT, os.fsencode(mount_name(name, kind)), ignore_enoent=True
            )


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError as exc:
        # ENOENT: the kernel had nothing cached, which is fine.
        if exc.errno != errno.ENOENT:
            log.debug("kernel cache invalidation failed: %s", exc)
