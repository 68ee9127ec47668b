"""The primary's replication sessions look only at the databases a commit named, and
send a commit just made from the memory it was captured in."""

from __future__ import annotations

from pathlib import Path

from litefspy.ltx.checksum import PageChecksums, page_checksum
from litefspy.replication.server import PrimaryIdentity, ReplicaSession, ReplicationServer
from litefspy.store.capture import write_ltx
from litefspy.store.database import Database
from litefspy.store.store import Store
from litefspy.store.types import ChecksumChanges, CommitInfo, Position

PAGE = 4096


def _server_with_a_session(store: Store) -> tuple[ReplicationServer, ReplicaSession]:
    """A primary's replication server with one connected replica's session."""
    server = ReplicationServer(
        store, PrimaryIdentity(1, "primary", "http://127.0.0.1:1"), cluster_id="c", epoch=1
    )
    session = ReplicaSession(
        node_id=2, hostname="replica", advertise_url="", peer="peer", connected_at_ms=0
    )
    server.sessions.append(session)
    return server, session


def test_a_commit_wakes_a_session_for_its_own_database_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    for name in ("a.db", "b.db", "c.db"):
        store.create(name)
    server, session = _server_with_a_session(store)
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


def _commit(db: Database, pgno: int, fill: int) -> CommitInfo:
    """One LTX commit of a single changed page, as capture writes it; its notice."""
    seen: list[CommitInfo] = []
    db.on_commit = seen.append
    sums = db.checksums if db.checksums is not None else PageChecksums(PAGE)
    data = bytes([fill]) * PAGE
    changes = ChecksumChanges(sums)
    changes.set(pgno, page_checksum(pgno, data))
    commit = max(pgno, sums.page_count)
    changes.truncate(commit)
    write_ltx(db, PAGE, commit, iter([(pgno, data)]), changes, full=db.pos.txid == 0)
    (info,) = seen
    return info


async def test_a_session_one_txid_behind_gets_the_commit_from_memory(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.open()
    db = store.create("a.db")
    server, session = _server_with_a_session(store)
    try:
        first = _commit(db, 1, 1)
        server._on_commit(first)
        have = db.pos
        second = _commit(db, 2, 2)
        assert second.captured is not None
        server._on_commit(second)
        # The file is not read: gone from disk, the commit still goes out, as captured.
        second.path.unlink()
        opened, diverged = await server._next_file(session, db, have, db.pos)
        assert opened is not None and not diverged
        assert opened.head == second.captured.ltx and opened.size == len(second.captured.ltx)
        assert opened.header.min_txid == 2
        assert opened.trailer.post_apply_checksum == db.pos.checksum
        # Two TXIDs behind: from the files (the one for TXID 2 is gone: none).
        opened, diverged = await server._next_file(session, db, Position(0, 0), db.pos)
        assert opened is not None and opened.header.min_txid == 1
        opened.close()
        # A replica one behind with another checksum is not sent the captured commit.
        opened, diverged = await server._next_file(
            session, db, Position(have.txid, have.checksum ^ 1), db.pos
        )
        assert opened is None
    finally:
        server.close()
        store.close()
