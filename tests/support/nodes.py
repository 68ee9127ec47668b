"""Test harness: litefspy nodes as real processes with real FUSE mounts."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


_MNT_FORCE = 1


def abort_fuse(path: Path) -> None:
    """Abort the FUSE connection mounted at `path` (no fusectl needed).

    umount2(MNT_FORCE) on a FUSE mount aborts its connection before it tries to
    unmount: every request waiting on the daemon fails at once. Called directly
    (not umount(8), which would stat the mount point and wait on the daemon).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(os.fsencode(path), _MNT_FORCE)
    force_unmount(path)


class NodeHung(AssertionError):
    """A node process did not finish exiting after SIGKILL (a litefspy defect)."""


class NodeProcess:
    """One `litefspy mount` process with its own config, data dir and mount point."""

    def __init__(
        self, root: Path, name: str = "node", *, config_extra: str = "", lease: str | None = None
    ) -> None:
        self.root = root / name
        self.name = name
        self.mnt = self.root / "mnt"
        self.data = self.root / "data"
        self.config_path = self.root / "fuse.yml"
        self.log_path = self.root / "node.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # What follows `litefspy mount` (run from `root`); a test may spell it otherwise.
        self.mount_args = ["-c", str(self.config_path)]
        self.root.mkdir(parents=True, exist_ok=True)
        lease_text = lease or (
            "lease:\n  type: static\n  candidate: true\n"
            f"  hostname: {name}\n  advertise-url: http://127.0.0.1:{self.port}\n"
        )
        self.config_path.write_text(
            f"fuse:\n  dir: {self.mnt}\n"
            f"data:\n  dir: {self.data}\n"
            f"grpc:\n  addr: 127.0.0.1:{self.port}\n"
            f"{lease_text}"
            "strict-verify: true\n"
            "log:\n  debug: true\n"
            f"{config_extra}"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def launch_prefix(self) -> list[str]:
        """What the node's command runs under (e.g. `ip netns exec NS`)."""
        return []

    @property
    def view(self) -> Path:
        """The mount as the test process reaches it."""
        return self.mnt

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [
                *self.launch_prefix,
                sys.executable,
                "-m",
                "litefspy",
                "mount",
                *self.mount_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.root,
        )
        log.close()
        if wait:
            self.wait_mounted(timeout)
        return self

    def wait_mounted(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited early:\n{self.log()}")
            try:
                return (self.view / ".lag").exists()
            except OSError:
                return False  # a dead mount left behind, not cleaned up yet

        wait_for(ready, timeout, what=f"{self.name} to mount")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Signal the node and wait for it; never hangs.

        A node that does not finish exiting within 10 s of SIGKILL is stuck in
        the kernel (waiting on its own mount): its FUSE connection is aborted
        so the test run goes on, and NodeHung is raised, since that is a defect.
        """
        if self.proc is None:
            return None
        proc = self.proc
        hung = False
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    hung = True
                    abort_fuse(self.mnt)
                    proc.wait(10)
        code = proc.returncode
        self.proc = None
        if os.path.ismount(self.mnt) or _is_stale(self.mnt):
            force_unmount(self.mnt)
        if hung:
            raise NodeHung(f"node {self.name} hung in exit after SIGKILL:\n{self.log()}")
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def db(self, name: str) -> Path:
        return self.mnt / name

    def ltx_dir(self, name: str) -> Path:
        return self.data / "dbs" / name / "ltx"

    def ltx_files(self, name: str) -> list[Path]:
        d = self.ltx_dir(name)
        return sorted(d.glob("*.ltx")) if d.exists() else []

    def pos(self, name: str) -> tuple[int, int]:
        text = (self.view / f"{name}-pos").read_text().strip()
        txid, checksum = text.split("/")
        return int(txid, 16), int(checksum, 16)


def _is_stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False
