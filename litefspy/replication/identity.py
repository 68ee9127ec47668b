"""The cluster id a node belongs to, persisted in its data dir.

The first primary of a cluster generates it; a replica adopts the id from the
first primary it streams from and keeps it, so that it never mixes the history
of one cluster with another's (the primary refuses a replica of another
cluster, with a message saying how to move on).
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from litefspy.errors import DatabaseError
from litefspy.ltx.files import atomic_write

CLUSTER_ID_FILE = "clusterid"
_CLUSTER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def new_cluster_id() -> str:
    """A fresh random cluster id."""
    return "LFPY" + secrets.token_hex(8).upper()


def valid_cluster_id(value: str) -> bool:
    """A non-empty id of letters, digits and `_.-`, at most 64 characters."""
    return bool(_CLUSTER_ID_RE.match(value))


def load_cluster_id(data_dir: Path) -> str | None:
    """The stored cluster id, None if this node never joined a cluster."""
    path = Path(data_dir) / CLUSTER_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not valid_cluster_id(text):
        raise DatabaseError(
            f"{path} is corrupt ({text[:80]!r}); delete it and the node adopts the "
            "cluster id of the primary it replicates from"
        )
    return text


def save_cluster_id(data_dir: Path, cluster_id: str) -> None:
    """Store the cluster id durably (temp file, fsync, rename)."""
    if not valid_cluster_id(cluster_id):
        raise DatabaseError(f"invalid cluster id {cluster_id[:80]!r}")
    with atomic_write(Path(data_dir) / CLUSTER_ID_FILE) as f:
        f.write(f"{cluster_id}\n".encode())
