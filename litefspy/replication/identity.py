"""What a node remembers about its cluster across restarts, in its data dir.

* `clusterid`: the cluster the node belongs to. The first primary of a
  cluster generates it (with etcd it is also stored next to the lease key); a
  replica adopts the id from etcd or from the first primary it streams from
  and keeps it, so that it never mixes the history of one cluster with
  another's (both sides refuse, with a message saying how to move on).
* `epoch`: the highest lease epoch (fencing token) the node has seen, with the
  lease it belongs to (`etcd:<key>` or `static`). A replica refuses a stream
  from a primary with an older epoch, also after a restart.
* `primary`: the last primary the node knew (`PrimaryInfo` JSON), so that a
  node that cannot reach etcd at start can still follow it and serve reads.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from litefspy.errors import DatabaseError, LeaseError
from litefspy.fsutil import atomic_write
from litefspy.lease.base import PrimaryInfo

CLUSTER_ID_FILE = "clusterid"
EPOCH_FILE = "epoch"
PRIMARY_FILE = "primary"
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


def load_max_epoch(data_dir: Path, scope: str) -> int:
    """The highest epoch seen for the lease `scope`; 0 if none (or another lease's)."""
    path = Path(data_dir) / EPOCH_FILE
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        raise DatabaseError(
            f"{path} is corrupt ({exc}); delete it (the node then trusts the epoch of the "
            "next primary it sees)"
        ) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("epoch"), int):
        raise DatabaseError(f"{path} is corrupt; delete it")
    # Epochs of one lease say nothing about another's (a new etcd key starts low).
    return int(obj["epoch"]) if obj.get("scope") == scope else 0


def save_max_epoch(data_dir: Path, scope: str, epoch: int) -> None:
    """Remember `epoch` as the highest seen for `scope` (temp file, fsync, rename)."""
    with atomic_write(Path(data_dir) / EPOCH_FILE) as f:
        f.write(json.dumps({"scope": scope, "epoch": epoch}).encode() + b"\n")


def load_last_primary(data_dir: Path) -> PrimaryInfo | None:
    """The last primary this node knew; None if none (or the file is unreadable)."""
    try:
        return PrimaryInfo.from_json((Path(data_dir) / PRIMARY_FILE).read_bytes())
    except (OSError, LeaseError):
        return None


def save_last_primary(data_dir: Path, primary: PrimaryInfo) -> None:
    """Remember the current primary (temp file, fsync, rename)."""
    with atomic_write(Path(data_dir) / PRIMARY_FILE) as f:
        f.write(primary.to_json().encode() + b"\n")
