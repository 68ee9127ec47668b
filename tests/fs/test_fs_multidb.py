"""Transactions across attached databases (super-journals) through real mounts.

SQLite commits a transaction that writes several databases in rollback-journal
modes with a super-journal MAIN-mjXXXXXXXXX next to the main database: each
journal points to it, and deleting it commits every database at once. A crash is
placed exactly around that deletion by an LD_PRELOAD shim in the application.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import dump, integrity, replica_of, wait_same_pos
from tests.support.nodes import NodeProcess

ROLLBACK_MODES = ["delete", "truncate", "persist"]

# Kills the application at a chosen point around the super-journal's deletion.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int unlink(const char *path) {
    static int (*real)(const char *);
    if (!real) real = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    const char *point = getenv("KILL_AT");
    if (!point || !strstr(path, "-mj")) return real(path);
    if (!strcmp(point, "before-super-delete")) kill(getpid(), SIGKILL);
    int rc = real(path);
    if (!strcmp(point, "after-super-delete")) kill(getpid(), SIGKILL);
    return rc;
}
"""

CROSS_COMMIT = r"""
import sqlite3, sys
main, aux, value = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(main, isolation_level=None, timeout=30)
c.execute("ATTACH ? AS aux", (aux,))
c.execute("PRAGMA cache_size=5")
c.execute("BEGIN")
for i in range(200):
    c.execute("INSERT INTO t VALUES (?, randomblob(600))", (value * 1000 + i,))
    c.execute("INSERT INTO aux.u VALUES (?, randomblob(600))", (value * 1000 + i,))
c.execute("COMMIT")
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
        check=True,
    )
    return d / "shim.so"


def _setup(node: NodeProcess, mode: str) -> None:
    c = sqlite3.connect(node.db("main.db"), isolation_level=None, timeout=30)
    c.execute(f"PRAGMA journal_mode={mode}")
    c.execute("ATTACH ? AS aux", (str(node.db("aux.db")),))
    c.execute(f"PRAGMA aux.journal_mode={mode}")
    c.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
    c.execute("CREATE TABLE aux.u (i INTEGER PRIMARY KEY, v BLOB)")
    c.close()


def _ids(node: NodeProcess) -> tuple[set[int], set[int]]:
    c = sqlite3.connect(node.db("main.db"), timeout=30)
    c.execute("ATTACH ? AS aux", (str(node.db("aux.db")),))
    t = {r[0] for r in c.execute("SELECT i FROM t")}
    u = {r[0] for r in c.execute("SELECT i FROM aux.u")}
    c.close()
    return t, u


def _cross_commit(node: NodeProcess, value: int, env: dict[str, str] | None = None) -> int:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CROSS_COMMIT,
            str(node.db("main.db")),
            str(node.db("aux.db")),
            str(value),
        ],
        env=env,
        check=False,
    )
    return proc.returncode


def _super_journals(node: NodeProcess) -> list[str]:
    return [n for n in os.listdir(node.mnt) if "-mj" in n] + os.listdir(node.data / "superjournals")


@pytest.mark.parametrize("mode", ROLLBACK_MODES)
def test_cross_database_transactions_commit_and_replicate(node_factory, mode: str) -> None:
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    _setup(primary, mode)
    before = primary.pos("main.db")[0], primary.pos("aux.db")[0]
    for value in range(1, 4):
        assert _cross_commit(primary, value) == 0
    # The sqlite3 CLI too.
    script = (
        f"ATTACH '{primary.db('aux.db')}' AS aux;\n"
        "BEGIN; INSERT INTO t VALUES (9, x'09'); INSERT INTO aux.u VALUES (9, x'09'); COMMIT;\n"
    )
    out = subprocess.run(
        ["sqlite3", str(primary.db("main.db"))],
        input=script,
        text=True,
        capture_output=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    t, u = _ids(primary)
    assert t == u and len(t) == 3 * 200 + 1
    # Each database's part is that database's next transaction.
    assert primary.pos("main.db")[0] == before[0] + 4
    assert primary.pos("aux.db")[0] == before[1] + 4
    assert _super_journals(primary) == []
    for name in ("main.db", "aux.db"):
        wait_same_pos(primary, [replica], name)
        assert dump(replica, name) == dump(primary, name)
        assert integrity(replica, name) == "ok"
    assert "refused" not in primary.log()


@pytest.mark.parametrize("kill_node", [True, False], ids=["node-killed", "app-only"])
@pytest.mark.parametrize("point", ["before-super-delete", "after-super-delete"])
@pytest.mark.parametrize("mode", ROLLBACK_MODES)
def test_crash_around_the_super_journal_deletion(
    node_factory, shim: Path, mode: str, point: str, kill_node: bool
) -> None:
    """Before the deletion neither database has the transaction, after it both do:
    on the primary (whether litefspy's recovery or SQLite through the mount decides)
    and on the replica."""
    primary: NodeProcess = node_factory("primary").start()
    replica = replica_of(node_factory, primary).start()
    _setup(primary, mode)
    assert _cross_commit(primary, 1) == 0
    env = dict(os.environ, LD_PRELOAD=str(shim), KILL_AT=point)
    assert _cross_commit(primary, 2, env) == -signal.SIGKILL
    if kill_node:
        primary.kill()
        primary.start()
    t, u = _ids(primary)
    assert t == u
    committed = point == "after-super-delete"
    assert (2000 in t) is committed
    assert len(t) == 200 * (2 if committed else 1)
    for name in ("main.db", "aux.db"):
        assert integrity(primary, name) == "ok"
    assert _super_journals(primary) == []
    # Writes go on, and the replica ends up with the same databases.
    assert _cross_commit(primary, 3) == 0
    for name in ("main.db", "aux.db"):
        wait_same_pos(primary, [replica], name)
        assert dump(replica, name) == dump(primary, name)
    assert "database offline" not in primary.log() + replica.log()
