"""Planned role changes through a real etcd lease: handoff and graceful stop.

`litefspy run --promote` moves the lease to a caught-up replica while the old
primary is being written to: the old primary becomes a replica, nothing it
acknowledged is lost, and the command runs on the new primary. A graceful stop
of the primary hands its last commits to the replicas and releases the lease,
so another candidate takes over within a second. `lease.promote: true` takes
the lease back automatically once the node has caught up.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

from tests.support.cluster import (
    Writer,
    connect,
    dump,
    etcd_node,
    first_writable,
    role,
    status,
    try_insert,
    values,
    wait_role,
    wait_same_pos,
)
from tests.support.etcd_server import EtcdServer, etcd_shared_fixture  # noqa: F401
from tests.support.nodes import wait_for

DB = "app.db"


def test_handoff_graceful_stop_and_automatic_promotion(
    node_factory, etcd_shared: EtcdServer
) -> None:
    key = f"handoff/{uuid.uuid4().hex}/primary"
    a = etcd_node(node_factory, etcd_shared.url, key, "a").start()
    wait_role(a, "primary")
    b = etcd_node(node_factory, etcd_shared.url, key, "b").start()
    c = etcd_node(node_factory, etcd_shared.url, key, "c").start()
    wait_role(b, "replica")
    wait_role(c, "replica")
    conn = connect(a.db(DB), "delete")
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    conn.close()
    wait_same_pos(a, [b, c], DB)
    epoch_a = status(a)["lease"]["epoch"]

    # Handoff a -> b in the middle of a write workload on a.
    insert = f"import sqlite3; sqlite3.connect({str(b.db(DB))!r}).execute('INSERT INTO t VALUES (5000000)').connection.commit(); print('wrote on b')"  # noqa: E501
    with Writer(a.db(DB)) as writer:
        wait_for(lambda: len(writer.acked) >= 50, 30, what="writes on a")
        promote = [sys.executable, "-m", "litefspy", "run", "--url", b.url, "--promote"]
        out = subprocess.run(
            [*promote, "--", sys.executable, "-c", insert],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        wait_for(lambda: not writer._thread.is_alive(), 10, what="a to refuse writes")
    assert out.returncode == 0, out.stderr + b.log()[-3000:]
    assert out.stdout == "wrote on b\n"
    assert "is now the primary" in out.stderr
    assert role(b) == "primary"
    wait_role(a, "replica")
    st = status(b)
    assert st["lease"]["epoch"] > epoch_a
    assert st["lease"]["holder"] == "b"
    assert not try_insert(a.db(DB), 6000000)
    wait_same_pos(b, [a, c], DB)
    assert set(writer.acked) <= set(values(b, DB)), "an acknowledged write was lost"
    assert 5000000 in values(b, DB)
    assert dump(a, DB) == dump(b, DB) == dump(c, DB)
    assert "lease handed off" in a.log_path.read_text()
    assert not list((a.data / "dbs" / DB).glob("aside-*")), "a's history diverged"
    # Promoting the primary is a no-op.
    out = subprocess.run(
        [sys.executable, "-m", "litefspy", "run", "--url", b.url, "--promote"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "already the primary" in out.stderr

    # Graceful stop of b while it is written to: a or c takes over within 1 s,
    # with every write b acknowledged.
    with Writer(b.db(DB), start=7_000_000) as writer:
        wait_for(lambda: len(writer.acked) >= 20, 30, what="writes on b")
        stopped_at = time.monotonic()
        stopper = threading.Thread(target=b.stop)
        stopper.start()
        new = first_writable([a, c], DB, 8_000_000, 5.0)
        takeover = time.monotonic() - stopped_at
        stopper.join()
    assert takeover <= 1.0, takeover
    other = c if new is a else a
    wait_role(other, "replica")
    wait_same_pos(new, [other], DB)
    assert set(writer.acked) <= set(values(new, DB)), "an acknowledged write was lost"

    # b comes back with lease.promote: true and takes the lease once caught up.
    b.config_path.write_text(b.config_path.read_text().replace("promote: false", "promote: true"))
    b.start()
    wait_role(b, "primary", 30)
    wait_role(new, "replica")
    assert try_insert(b.db(DB), 9_000_000)
    wait_same_pos(b, [a, c], DB)
    assert dump(a, DB) == dump(b, DB) == dump(c, DB)
    assert "lease.promote: took over the lease" in b.log_path.read_text()
