"""What a node remembers about its lease across restarts, and how status shows the lease."""

from __future__ import annotations

from pathlib import Path

import pytest

from litefspy.errors import DatabaseError
from litefspy.lease.base import PrimaryInfo
from litefspy.replication.identity import (
    load_last_primary,
    load_max_epoch,
    save_last_primary,
    save_max_epoch,
)
from litefspy.rpc.convert import status_to_dict
from litefspy.v1 import admin_pb2 as pb


def test_max_epoch_is_kept_per_lease(tmp_path: Path) -> None:
    assert load_max_epoch(tmp_path, "etcd:app/primary") == 0
    save_max_epoch(tmp_path, "etcd:app/primary", 42)
    assert load_max_epoch(tmp_path, "etcd:app/primary") == 42
    # Another key's (or a static lease's) epochs start over: they are not comparable.
    assert load_max_epoch(tmp_path, "etcd:other/primary") == 0
    assert load_max_epoch(tmp_path, "static") == 0
    (tmp_path / "epoch").write_text("not json")
    with pytest.raises(DatabaseError, match="epoch is corrupt"):
        load_max_epoch(tmp_path, "static")


def test_last_primary_round_trips(tmp_path: Path) -> None:
    assert load_last_primary(tmp_path) is None
    info = PrimaryInfo(hostname="a", advertise_url="http://a:20202", node_id="00000000000000AA")
    save_last_primary(tmp_path, info)
    assert load_last_primary(tmp_path) == info
    (tmp_path / "primary").write_text("{")
    assert load_last_primary(tmp_path) is None


def test_status_shows_the_lease_holder_only_when_the_engine_names_one() -> None:
    reply = pb.StatusReply(
        node=pb.NodeInfo(id="01", hostname="b", advertise_url="http://b"),
        role="replica",
        lease=pb.LeaseStatus(type="etcd", epoch=7, holder="a"),
        candidate=True,
    )
    out = status_to_dict(reply)
    assert out["lease"] == {"type": "etcd", "epoch": 7, "expires_in_ms": None, "holder": "a"}
    assert out["candidate"] is True
    reply.lease.ClearField("holder")
    reply.lease.expires_in_ms = 1500
    assert status_to_dict(reply)["lease"] == {"type": "etcd", "epoch": 7, "expires_in_ms": 1500}
