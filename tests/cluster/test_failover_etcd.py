"""The cluster when etcd is in trouble, and the lease's fencing and cluster identity.

* etcd down when the nodes start: they mount, serve reads of what they have,
  say so in their logs, and elect a primary as soon as etcd is back;
* etcd killed while a primary is being written to: the primary stops
  accepting writes before its lease could expire; etcd restarted: the
  cluster recovers by itself with every acknowledged write;
* a stream from a primary whose epoch is older than one the replica has seen
  is refused (also after a restart: the epoch is persisted);
* a node whose data belongs to another cluster refuses to join.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import httpx

from litefspy.lease.base import PrimaryInfo
from litefspy.replication.client import ReplicaIdentity, ReplicationClient
from litefspy.store.store import Store
from litefspy.v1 import replication_pb2 as pb
from tests.faults.test_replication_faults import FakePrimary, frame
from tests.support.cluster import (
    Writer,
    connect,
    dump,
    etcd_node,
    first_writable,
    role,
    try_insert,
    values,
    wait_role,
    wait_same_pos,
)
from tests.support.etcd_server import EtcdServer, etcd_private_fixture, etcd_shared_fixture  # noqa: F401
from tests.support.nodes import wait_for

TTL = 2.0
DB = "app.db"


def test_etcd_down_at_start_lost_mid_run_and_restarted(
    node_factory, etcd_private: EtcdServer
) -> None:
    key = f"trouble/{uuid.uuid4().hex}/primary"
    a = etcd_node(node_factory, etcd_private.url, key, "a").start()
    wait_role(a, "primary")
    b = etcd_node(node_factory, etcd_private.url, key, "b").start()
    wait_role(b, "replica")
    conn = connect(a.db(DB), "wal")
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(10)])
    conn.close()
    wait_same_pos(a, [b], DB)
    b.stop()
    a.stop()
    # A graceful stop releases the lease; nothing was lost, and the log says so.
    stopped = a.log_path.read_text()
    assert "lease released" in stopped and "lease revoked" in stopped
    assert "lease lost" not in stopped

    # etcd is down when the nodes start: they serve reads and keep retrying.
    etcd_private.stop()
    a.start()
    b.start()
    for node in (a, b):
        assert values(node, DB) == list(range(10))
        assert not try_insert(node.db(DB), 100)
        wait_for(lambda n=node: "cannot reach the lease engine" in n.log(), 10, what="log")
    assert role(a) == "candidate-waiting"

    etcd_private.start()
    primary = first_writable([a, b], DB, 100, 15)
    other = b if primary is a else a
    wait_role(other, "replica")

    # etcd dies mid-run: the primary stops taking writes before its lease could expire.
    with Writer(primary.db(DB), start=1000) as writer:
        wait_for(lambda: len(writer.acked) >= 20, 30, what="writes on the primary")
        killed_at = time.monotonic()
        etcd_private.kill()
        wait_for(lambda: not writer._thread.is_alive(), TTL + 2, what="writes to be refused")
    assert writer.last_ok - killed_at < TTL, writer.last_ok - killed_at
    wait_role(primary, "candidate-waiting")
    assert values(other, DB)  # the replica still serves reads

    # etcd comes back: the cluster recovers by itself, with every acknowledged write.
    etcd_private.start()
    new = first_writable([a, b], DB, 5000, TTL * 3 + 5)
    other = b if new is a else a
    wait_role(other, "replica")
    wait_same_pos(new, [other], DB)
    assert dump(a, DB) == dump(b, DB)
    assert set(writer.acked) <= set(values(new, DB))
    assert "lease engine reachable again" in primary.log_path.read_text()


def grant_and_put(server: EtcdServer, key: str, value: str, ttl: int = 30) -> int:
    """Put `key` with a lease behind the nodes' back; return the revision (the epoch)."""
    with httpx.Client(trust_env=False, timeout=5) as client:
        grant = client.post(f"{server.url}/v3/lease/grant", json={"TTL": str(ttl)}).json()
        put = client.post(
            f"{server.url}/v3/kv/put",
            json={
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(value.encode()).decode(),
                "lease": grant["ID"],
            },
        ).json()
    return int(put["header"]["revision"])


def hello_frame(epoch: int) -> bytes:
    return frame(hello=pb.Hello(node_id=0xAB, hostname="fake", epoch=epoch))


def test_stream_from_an_older_epoch_is_refused_even_after_restart(
    node_factory, etcd_shared: EtcdServer
) -> None:
    key = f"fencing/{uuid.uuid4().hex}/primary"
    scripts = [
        [hello_frame(1)],  # older than the epoch in etcd
        [hello_frame(10**6), frame(ready=pb.Ready())],  # newer: accepted
        [hello_frame(5)],  # older than one already seen
    ]
    with FakePrimary(scripts) as fake:
        epoch = grant_and_put(
            etcd_shared,
            key,
            PrimaryInfo(
                hostname="fake", advertise_url=fake.url, node_id="00000000000000AB"
            ).to_json(),
        )
        r = etcd_node(node_factory, etcd_shared.url, key, "r", candidate=False).start()
        wait_for(lambda: not fake.scripts, 20, what="every scripted stream")
        wait_for(lambda: r.log().count("refusing a stale primary") >= 2, 10, what="refusals")
        log = r.log_path.read_text()
        assert f"lease epoch 1, older than epoch {epoch} already seen" in log
        assert "connected to primary primary=fake" in log
        assert "lease epoch 5, older than epoch 1000000 already seen" in log
        r.stop()

    saved = json.loads((r.data / "epoch").read_text())
    assert saved == {"scope": f"etcd:{key}", "epoch": 10**6}
    # What a restarted node's replication client starts from.
    store = Store(r.data)
    client = ReplicationClient(
        store,
        ReplicaIdentity(store.node_id, "r", "http://r"),
        primary_url="",
        data_dir=r.data,
        cluster_id=None,
        epoch_scope=f"etcd:{key}",
    )
    assert client.max_epoch == 10**6


def test_node_of_another_cluster_refuses_to_join(node_factory, etcd_shared: EtcdServer) -> None:
    key = f"cluster/{uuid.uuid4().hex}/primary"
    a = etcd_node(node_factory, etcd_shared.url, key, "a").start()
    wait_role(a, "primary")
    x = etcd_node(node_factory, etcd_shared.url, key, "x")
    Path(x.data).mkdir(parents=True)
    (x.data / "clusterid").write_text("LFPYOTHERCLUSTER0\n")
    x.start(wait=False)
    assert x.proc is not None
    assert x.proc.wait(30) == 1
    log = x.log_path.read_text()
    assert "cluster id mismatch" in log
    assert "belongs to cluster LFPYOTHERCLUSTER0" in log
    assert "move data.dir aside" in log
    assert role(a) == "primary"
