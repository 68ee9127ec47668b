"""A private, real etcd for tests: its own ports on 127.0.0.1 and its own data dir.

`EtcdServer` runs the `etcd` binary as a child process and can stop it
gracefully, kill -9 it, pause it (SIGSTOP, to simulate an etcd that accepts
connections but never answers), resume it, and restart it on the same ports
and data dir. It never talks to a system-wide etcd: every URL it hands out
points at ports it picked itself.

Fixtures (import the `*_fixture` function into a test module, `# noqa: F401`,
and ask for the fixture by its name):

* `etcd_shared`: one server for the whole session (tests use distinct keys);
* `etcd_private`: a fresh server per test, for tests that stop or kill it.

Both skip the test, with the reason, if there is no `etcd` binary.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def dead_endpoint() -> str:
    """A client URL on 127.0.0.1 where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


class EtcdServer:
    """One single-member etcd cluster in a child process."""

    def __init__(self, data_root: Path, binary: str = "etcd", name: str = "test") -> None:
        self.binary = binary
        self.name = name
        self.data_dir = data_root / "etcd-data"
        self.log_path = data_root / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """The client URL (what `lease.etcd.endpoints` would list)."""
        return f"http://127.0.0.1:{self.client_port}"

    def _command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"litefspy-test-{self.client_port}",
            "--logger",
            "zap",
            "--log-level",
            "error",
            # Faster leader election at start; the minimum lease TTL follows it
            # (1.5 x election timeout), so 2 s TTLs stay valid.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]

    def start(self) -> None:
        """Start (or restart) etcd and wait until it answers /health."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("etcd is already running")
        # ETCD_* variables from the caller's environment would override our flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal is for pytest, not etcd
            )
        self._paused = False
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        give_up = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < give_up:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with code {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd not healthy within {STARTUP_TIMEOUT}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Whether etcd answers /health with health=true right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        """The end of etcd's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9: no chance to flush or say goodbye."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel but never answered."""
        assert self.proc is not None and self.proc.poll() is None, "etcd is not running"
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._paused and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self) -> None:
        """Stop and start again on the same ports and data dir."""
        self.stop()
        self.start()


def require_etcd_binary() -> str:
    """The etcd binary's path, or skip the test saying why."""
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd binary not found on PATH (Debian/Ubuntu: apt-get install etcd-server)")
    return binary


def _run_server(name: str) -> Iterator[EtcdServer]:
    binary = require_etcd_binary()
    with tempfile.TemporaryDirectory(prefix=f"litefspy-{name}-") as tmp:
        server = EtcdServer(Path(tmp), binary=binary)
        server.start()
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture(scope="session", name="etcd_shared")
def etcd_shared_fixture() -> Iterator[EtcdServer]:
    """One etcd for the session; tests must use their own keys and leave it running."""
    yield from _run_server("etcd-shared")


@pytest.fixture(name="etcd_private")
def etcd_private_fixture() -> Iterator[EtcdServer]:
    """A fresh etcd for one test, which may stop, pause, kill or restart it."""
    yield from _run_server("etcd")
