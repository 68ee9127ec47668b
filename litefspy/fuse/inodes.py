"""Inode numbers for the names inside the mount.

Every name gets an inode number when first looked up or created. When a file is
unlinked (SQLite deletes its journal after every transaction in DELETE mode) its
number is retired and a re-created file gets a new one, so the kernel never
confuses an unlinked inode it still references with the new file. Retired
entries are dropped once the kernel forgets them, which keeps the table small.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import pyfuse3

from litefspy.store.files import is_super_journal_name
from litefspy.store.types import FileKind


class Special(Enum):
    """Virtual files litefspy serves itself."""

    POS = "-pos"  # per database
    PRIMARY = ".primary"
    LAG = ".lag"


class Local(Enum):
    """Files kept on this node only, never replicated (the node's name is the whole name)."""

    SUPER_JOURNAL = "super-journal"  # SQLite's MAIN-mjXXXXXXXXX of a multi-database commit
    COPY = "copy"  # a file being copied in (cp, rsync), staged until it is imported


NodeKind = FileKind | Special | Local


@dataclass
class Node:
    """One inode: a database file, a sidecar, or a virtual file."""

    ino: int
    name: str  # database name, or the special file's name
    kind: NodeKind
    lookups: int = 0
    retired: bool = False
    # The mtime the kernel was last told, and when (see attrs.Attributes.shown_mtime).
    shown_mtime_ns: int | None = None
    shown_at: float = 0.0

    @property
    def key(self) -> tuple[str, NodeKind]:
        return (self.name, self.kind)


def parse_name(name: str) -> tuple[str, NodeKind]:
    """Split a name inside the mount into (database name, kind)."""
    if name in (Special.PRIMARY.value, Special.LAG.value):
        return name, Special(name)
    if is_super_journal_name(name):
        return name, Local.SUPER_JOURNAL
    for kind in (FileKind.JOURNAL, FileKind.WAL, FileKind.SHM):
        if name.endswith(kind.value):
            return name[: -len(kind.value)], kind
    if name.endswith(Special.POS.value):
        return name[: -len(Special.POS.value)], Special.POS
    return name, FileKind.DATABASE


def mount_name(db: str, kind: NodeKind) -> str:
    """The inverse of parse_name."""
    if kind in (Special.PRIMARY, Special.LAG) or isinstance(kind, Local):
        return db
    suffix: str = kind.value
    return db + suffix


class InodeTable:
    """Maps inode numbers to nodes and (name, kind) to the current inode."""

    def __init__(self) -> None:
        self._next = pyfuse3.ROOT_INODE + 1
        self._nodes: dict[int, Node] = {}
        self._current: dict[tuple[str, NodeKind], Node] = {}

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def node_for(self, name: str, kind: NodeKind) -> Node:
        """The current node for a name, allocating an inode number if needed."""
        node = self._current.get((name, kind))
        if node is None:
            node = Node(self._next, name, kind)
            self._next += 1
            self._nodes[node.ino] = node
            self._current[node.key] = node
        return node

    def current(self, name: str, kind: NodeKind) -> Node | None:
        return self._current.get((name, kind))

    def retire(self, name: str, kind: NodeKind) -> Node | None:
        """The name was unlinked: the next file with that name gets a new inode."""
        node = self._current.pop((name, kind), None)
        if node is not None:
            node.retired = True
            if node.lookups <= 0:
                self._nodes.pop(node.ino, None)
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            return
        node.lookups -= count
        if node.lookups <= 0 and node.retired:
            del self._nodes[ino]

    def __len__(self) -> int:
        return len(self._nodes)
