"""The mount's root directory: every database's files, the virtual files,
super-journals."""

from __future__ import annotations

import os

import pyfuse3

from litefspy.fuse.attrs import Attributes, ClusterView
from litefspy.fuse.inodes import InodeTable, Local, NodeKind, Special, mount_name
from litefspy.store.store import Store
from litefspy.store.types import FileKind


def root_listing(
    store: Store, cluster: ClusterView, inodes: InodeTable, attrs: Attributes
) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
    """The root directory's entries with their attributes, in a stable order."""
    entries: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
    names: list[tuple[str, NodeKind]] = []
    for db in store.databases():
        for file_kind in FileKind:
            if db.path(file_kind).exists():
                names.append((db.name, file_kind))
        if db.exists():
            names.append((db.name, Special.POS))
    for entry in sorted(os.listdir(store.super_dir)):
        names.append((entry, Local.SUPER_JOURNAL))
    if cluster.primary_hostname() is not None:
        names.append((Special.PRIMARY.value, Special.PRIMARY))
    names.append((Special.LAG.value, Special.LAG))
    for db_name, kind in names:
        node = inodes.node_for(db_name, kind)
        try:
            entries.append((os.fsencode(mount_name(db_name, kind)), attrs.of(node)))
        except (OSError, pyfuse3.FUSEError):
            continue  # vanished while listing
    return entries
