"""`make run`: a local primary and a replica on loopback, until Ctrl-C.

The primary uses `fuse.yml` from the current directory as is; the replica's
config is derived from it (its own mount, data dir and gRPC port, candidate
false, hostname "replica") and written next to its data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from litefspy.config import load_config, split_host_port


def _replica_config(primary: dict[str, Any], root: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(yaml.safe_dump(primary))
    host, port = split_host_port(str(primary.get("grpc", {}).get("addr", "127.0.0.1:20202")))
    cfg["fuse"]["dir"] = str(root / "replica" / "mnt")
    cfg["data"]["dir"] = str(root / "replica" / "data")
    cfg.setdefault("grpc", {})["addr"] = f"{host or '127.0.0.1'}:{port + 1}"
    cfg["lease"]["hostname"] = "replica"
    cfg["lease"]["candidate"] = False
    return cfg


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "litefspy", "mount", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()


def _wait_mounted(proc: subprocess.Popen[bytes], mnt: Path, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (mnt / ".lag").exists():
        if proc.poll() is not None:
            raise SystemExit(f"litefspy exited early; see {log}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"litefspy did not mount {mnt} in {timeout}s; see {log}")
        time.sleep(0.1)


def main() -> int:
    """Start both nodes, print where to point apps, stop both on Ctrl-C."""
    config_path = Path("fuse.yml")
    primary_cfg = load_config(config_path)
    raw = yaml.safe_load(config_path.read_text())
    root = Path(primary_cfg.fuse.dir).resolve().parent.parent
    replica_dir = root / "replica"
    replica_dir.mkdir(parents=True, exist_ok=True)
    replica_yml = replica_dir / "fuse.yml"
    replica_yml.write_text(yaml.safe_dump(_replica_config(raw, root), sort_keys=False))
    Path(primary_cfg.data.dir).mkdir(parents=True, exist_ok=True)
    logs = {"primary": root / "primary.log", "replica": root / "replica.log"}
    procs = {
        "primary": _start(config_path.resolve(), logs["primary"]),
        "replica": _start(replica_yml, logs["replica"]),
    }
    mounts = {"primary": Path(primary_cfg.fuse.dir).resolve(), "replica": root / "replica" / "mnt"}
    try:
        for name, proc in procs.items():
            _wait_mounted(proc, mounts[name], logs[name])
        url = primary_cfg.grpc.client_address
        replica_url = load_config(replica_yml).grpc.client_address
        print(
            "\nlitefspy is running (Ctrl-C stops both nodes):\n"
            f"  primary  (read-write): {mounts['primary']}\n"
            f"  replica  (read-only):  {mounts['replica']}\n"
            f"  logs: {logs['primary']}, {logs['replica']}\n\n"
            "Point an app at the primary, for example:\n"
            f"  sqlite3 {mounts['primary']}/app.db 'CREATE TABLE t(x); INSERT INTO t VALUES (1)'\n"
            f"  sqlite3 {mounts['replica']}/app.db 'SELECT * FROM t'\n"
            f"  cat {mounts['primary']}/app.db-pos\n"
            f"  .venv/bin/litefspy status --url http://{url}\n\n"
            "Write from the replica (forwarded to the primary):\n"
            f"  .venv/bin/litefspy run --url http://{replica_url} --with-halt-lock-on app.db -- "
            f"sqlite3 {mounts['replica']}/app.db 'INSERT INTO t VALUES (2)'\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        print(f"node(s) exited: {', '.join(dead)}; see the logs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not abandon the nodes half-stopped (and mounted).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
