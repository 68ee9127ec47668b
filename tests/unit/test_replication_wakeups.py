"""The primary's replication sessions look only at the databases a commit named."""

from __future__ import annotations

from pathlib import Path

from litefspy.replication.server import PrimaryIdentity, ReplicaSession, ReplicationServer
from litefspy.store.store import Store
from litefspy.store.types import CommitInfo


def test_a_commit_wakes_a_session_for_its_own_database_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    for name in ("a.db", "b.db", "c.db"):
        store.create(name)
    server = ReplicationServer(
        store, PrimaryIdentity(1, "primary", "http://127.0.0.1:1"), cluster_id="c", epoch=1
    )
    session = ReplicaSession(
        node_id=2, hostname="replica", advertise_url="", peer="peer", connected_at_ms=0
    )
    server.sessions.append(session)
    try:
        # The first pass looks at every database.
        assert [db.name for db in server._to_look_at(session, False)] == ["a.db", "b.db", "c.db"]
        assert server._to_look_at(session, False) == []
        server._on_commit(CommitInfo("b.db", 7, tmp_path / "x.ltx", 100, 0))
        assert session.wake.is_set()
        assert [db.name for db in server._to_look_at(session, False)] == ["b.db"]
        assert server._to_look_at(session, False) == []
        # A commit to a database unknown here (deleted meanwhile) is skipped.
        server._on_commit(CommitInfo("gone.db", 1, tmp_path / "y.ltx", 100, 0))
        server._on_commit(CommitInfo("c.db", 1, tmp_path / "z.ltx", 100, 0))
        assert [db.name for db in server._to_look_at(session, False)] == ["c.db"]
        # Ending (the final pass) and retries look at everything again.
        assert len(server._to_look_at(session, True)) == 3
        session.full_pass = True
        assert len(server._to_look_at(session, False)) == 3
    finally:
        server.close()
        store.close()
