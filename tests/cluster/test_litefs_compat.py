"""Coming from LiteFS, through the real CLI: `mount -config litefs.yml`, litefs.yml found
without a flag, `run -promote -if-candidate -with-halt-lock-on`, `export -name -url`, and
the config mistakes LiteFS users make (duplicate keys, `http.addr`) as one-line errors."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support.nodes import NodeProcess

UNSET = "LITEFSPY_TEST_NEVER_SET"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    env["HOME"] = str(cwd)  # no ~/fuse.yml of the machine's user can win the search
    return subprocess.run(
        [sys.executable, "-m", "litefspy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_litefs_spellings_on_a_real_mount(node_factory) -> None:
    node: NodeProcess = node_factory("node")
    litefs_yml = node.root / "litefs.yml"
    text = node.config_path.read_text()
    assert "hostname: node\n" in text
    litefs_yml.write_text(text.replace("hostname: node\n", f"hostname: node${{{UNSET}}}\n"))
    node.config_path.unlink()
    node.mount_args = ["-config", "litefs.yml"]
    os.environ.pop(UNSET, None)
    node.start()

    # The unset variable expanded to "" and the node said so, naming it.
    assert f"environment variable {UNSET} is not set" in node.log()

    # No flag at all: ./litefs.yml is found (no fuse.yml in cwd or HOME), so is the node.
    args = ["status", "--json"]
    if Path("/etc/fuse.yml").exists():  # would come first, by design
        args += ["-config", "litefs.yml"]
    res = cli(*args, cwd=node.root)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["role"] == "primary"
    assert st["node"]["hostname"] == "node"

    # LiteFS's `run` flags. On a static primary: already primary, a candidate, and
    # the halt lock is not needed, so the command runs and writes directly.
    write = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('CREATE TABLE t (x)'); c.execute('INSERT INTO t VALUES (42)'); c.commit()"
    )
    res = cli(
        "run",
        "-config",
        "litefs.yml",
        "-promote",
        "-if-candidate",
        "-with-halt-lock-on",
        "app.db",
        "--",
        sys.executable,
        "-c",
        write,
        str(node.db("app.db")),
        cwd=node.root,
    )
    assert res.returncode == 0, res.stderr
    assert "already the primary" in res.stderr
    assert "app.db is writable there" in res.stderr
    conn = sqlite3.connect(node.db("app.db"))
    try:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        conn.close()
    assert node.pos("app.db")[0] >= 1

    # `litefs export -name DB PATH`, as LiteFS spells it.
    out = node.root / "copy.db"
    res = cli("export", "-name", "app.db", "-url", node.url, str(out), cwd=node.root)
    assert res.returncode == 0, res.stderr
    conn = sqlite3.connect(out)
    try:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    finally:
        conn.close()

    # The long spellings still work, side by side with the aliases.
    res = cli("status", "--config", "litefs.yml", cwd=node.root)
    assert res.returncode == 0, res.stderr
    assert "app.db" in res.stdout


def test_config_mistakes_stop_mount_with_one_line(tmp_path: Path) -> None:
    base = f"fuse:\n  dir: {tmp_path / 'mnt'}\ndata:\n  dir: {tmp_path / 'data'}\n"
    cases = {
        "dup.yml": (
            base + "lease:\n  type: static\nlease:\n  type: etcd\n",
            'duplicate key "lease" at line 7 (first at line 5)',
        ),
        "http.yml": (
            base + "lease:\n  type: static\nhttp:\n  addr: ':20202'\n",
            'unknown key "http.addr" (litefspy calls this grpc.addr)',
        ),
        "both-unset.yml": (
            base + f"lease:\n  type: static\n  candidate: ${{{UNSET} == {UNSET}_2}}\n",
            f"neither {UNSET} nor {UNSET}_2 is set",
        ),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        res = cli("mount", "-config", name, cwd=tmp_path)
        assert res.returncode == 1, (name, res.stderr)
        assert res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith(f"litefspy: {name}: "), res.stderr
        assert message in res.stderr
        assert not (tmp_path / "data").exists(), "a rejected config must not start anything"
