"""`exec:` in fuse.yml on real node processes: exit codes, signals, if-candidate."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from tests.support.cluster import connect, replica_of
from tests.support.nodes import NodeProcess, wait_for
from tests.unit.test_exec_supervisor import TRAPPER

PY = shlex.quote(sys.executable)


def _exec(commands: Any) -> str:
    return f"exec: {json.dumps(commands)}\n"  # JSON is YAML


def _script(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


def test_node_exits_with_the_last_commands_code(node_factory, tmp_path: Path) -> None:
    marker = tmp_path / "app-ran"
    app = _script(
        "import os, sys; assert os.path.exists(sys.argv[1]); "
        f"open({str(marker)!r}, 'w'); sys.exit(3)"
    )
    node: NodeProcess = node_factory("node", config_extra=_exec(f"{app} {tmp_path / 'node/mnt'}"))
    node.start(wait=False)
    assert node.proc is not None
    assert node.proc.wait(30) == 3, node.log()
    assert marker.exists()


def test_signals_reach_the_command(node_factory, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    cmd = f"{_script(TRAPPER)} {shlex.quote(str(marker))}"
    node: NodeProcess = node_factory("node", config_extra=_exec([{"cmd": cmd}]))
    node.start(wait=False)
    wait_for(lambda: marker.exists() and marker.read_text() == "ready", 30, what="command start")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 7, node.log()
    assert marker.read_text() == "ready got SIGTERM"


def test_replica_skips_if_candidate_and_starts_after_catching_up(
    node_factory, tmp_path: Path
) -> None:
    primary: NodeProcess = node_factory("primary").start()
    conn = connect(primary.db("app.db"))
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    conn.close()
    migrated = tmp_path / "migrated"
    seen = tmp_path / "seen"
    mnt = tmp_path / "replica" / "mnt" / "app.db"
    # The app reads the database at start: it must already be caught up.
    app = _script(
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        f"open({str(seen)!r}, 'w').write(str(c.execute('SELECT count(*) FROM t').fetchone()[0]))"
    )
    exec_ = [
        {"cmd": f"touch {shlex.quote(str(migrated))}", "if-candidate": True},
        {"cmd": f"{app} {shlex.quote(str(mnt))}"},
    ]
    replica = replica_of(node_factory, primary, config_extra=_exec(exec_))
    replica.start(wait=False)
    assert replica.proc is not None
    assert replica.proc.wait(30) == 0, replica.log()
    assert seen.read_text() == "50"
    assert not migrated.exists()
