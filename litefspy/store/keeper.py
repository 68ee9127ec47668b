"""The lock keeper: a small process that holds litefspy's descriptors on its own mount.

Why a separate process (issue: a SIGKILLed node hung forever in exit). Any
system call the daemon makes on its *own* mount waits for the daemon to answer
it. If the daemon is killed while one of its threads waits on such a call (a
getattr already read by the dying FUSE loop, or the flush of pages apps dirtied
through mmap when a descriptor is closed at exit), that thread can never finish,
so the process never finishes exiting, so /dev/fuse is never closed, so the
kernel never aborts the connection: the node and every application on the
mount hang. No flag or watchdog catches every such window on every machine.

So the daemon never touches its mount at all. Everything litefspy does through
the mount (SQLite-compatible OFD locks, the short-lived SQLite connection that
builds a WAL index, rewriting the WAL-index header) runs in this keeper process
instead. When the daemon dies, its exit cannot block on its mount; closing
/dev/fuse aborts the connection, which fails whatever the keeper was waiting on,
and the keeper exits when its control socket reaches end of file.

Protocol: the daemon passes one socket per calling thread over the control
socket (SCM_RIGHTS); each is served by its own keeper thread, so a call waiting
up to 30 s for a SQLite lock delays no other. Messages are pickled tuples
(`multiprocessing.connection` framing) between two processes of the same node.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from litefspy.errors import DatabaseError
from litefspy.logs import kv
from litefspy.store.locks import Held, HeldLocks, MountLocks

log = logging.getLogger(__name__)


class KeeperGone(DatabaseError):
    """The lock keeper process exited; the locks it held are released."""


# --------------------------------------------------------------- the keeper


class _Server:
    """Keeper side: one MountLocks, the held lock sets by id, a thread per channel."""

    def __init__(self, mountpoint: Path, timeout: float) -> None:
        self.locks = MountLocks(mountpoint, timeout)
        self.held: dict[int, HeldLocks] = {}
        self.guard = threading.Lock()
        self.ids = itertools.count(1)

    def _keep(self, held: HeldLocks) -> int:
        with self.guard:
            hid = next(self.ids)
            self.held[hid] = held
            return hid

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        if method == "release":
            with self.guard:
                held = self.held.pop(args[0], None)
            if held is not None:
                held.release()
            return None
        if method == "writers":
            name, wal, timeout, extend = args
            with self.guard:
                base = self.held.get(extend) if extend is not None else None
            if extend is not None:
                if base is None:
                    raise DatabaseError(f"halt lock on {name} is no longer held")
                self.locks.writers(name, wal, timeout, base)
                return extend
            return self._keep(self.locks.writers(name, wal, timeout))
        if method in ("read", "exclusive", "exclude_readers"):
            return self._keep(getattr(self.locks, method)(*args))
        if method == "reset_wal_index":
            self.locks.reset_wal_index(*args)
            return None
        if method == "reset_and_release":
            hid, name, page_size = args
            try:
                self.locks.reset_wal_index(name, page_size)
            finally:
                self.call("release", (hid,))
            return None
        raise DatabaseError(f"lock keeper: unknown call {method!r}")

    def serve_channel(self, chan: Connection) -> None:
        with chan:
            while True:
                try:
                    method, args = chan.recv()
                except (EOFError, OSError):
                    return
                try:
                    reply: tuple[bool, Any] = (True, self.call(method, args))
                except Exception as exc:  # sent back and raised in the daemon
                    reply = (False, exc)
                try:
                    chan.send(reply)
                except (OSError, ValueError):
                    return


def _serve(mountpoint: Path, control_fd: int, timeout: float) -> None:
    server = _Server(mountpoint, timeout)
    control = socket.socket(fileno=control_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            break
        if not msg:
            break  # the daemon is gone or shutting down
        if msg == b"c" and fds:
            chan = Connection(fds[0])
            threading.Thread(target=server.serve_channel, args=(chan,), daemon=True).start()
        elif msg == b"q":
            # Clean shutdown: let go of the mount while the daemon still answers.
            with server.guard:
                for held in server.held.values():
                    held.release()
                server.held.clear()
            server.locks.close()
            control.sendall(b"q")
            break
    # Not a normal exit: a thread may still wait on the mount of a dead daemon.
    os._exit(0)


def main(argv: list[str]) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the daemon shuts
    # down cleanly and then tells the keeper to go.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _serve(Path(argv[0]), int(argv[1]), float(argv[2]))


# --------------------------------------------------------------- the daemon


class RemoteHeld:
    """A lock set held in the keeper; release() lets it go (from any thread)."""

    def __init__(self, keeper: LockKeeper, hid: int, generation: int) -> None:
        self.keeper = keeper
        self.hid = hid
        self.generation = generation

    def release(self) -> None:
        if self.hid:
            hid, self.hid = self.hid, 0
            self.keeper.release(hid, self.generation)


class LockKeeper:
    """Daemon side of the keeper: MountLocks' calls, each one round trip to the keeper.

    Started when the mount exists; restarted on the next call if it died (its
    locks died with it: a call in flight then fails with KeeperGone).
    """

    def __init__(self, mountpoint: Path, timeout: float = 30.0) -> None:
        self.mountpoint = mountpoint
        self.timeout = timeout
        self._guard = threading.Lock()
        self._local = threading.local()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._generation = 0
        self._closed = False

    def _start(self) -> None:
        """Start the keeper process (caller holds _guard)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "litefspy.store.keeper",
                    str(self.mountpoint),
                    str(theirs.fileno()),
                    str(self.timeout),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._control = ours
        self._generation += 1
        log.debug("lock keeper started %s", kv(pid=self._proc.pid))

    def start(self) -> None:
        with self._guard:
            if self._proc is None:
                self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _channel(self) -> tuple[Connection, int]:
        """This thread's connection to the keeper (made on first use)."""
        cached = getattr(self._local, "chan", None)
        if cached is not None and cached[1] == self._generation:
            return cached  # type: ignore[no-any-return]
        with self._guard:
            if self._closed:
                raise KeeperGone("the lock keeper is shut down")
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    log.warning(
                        "lock keeper exited; starting a new one %s", kv(code=self._proc.returncode)
                    )
                    assert self._control is not None
                    self._control.close()
                self._start()
            assert self._control is not None
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(self._control, [b"c"], [theirs.fileno()])
            except OSError as exc:
                ours.close()
                raise KeeperGone(f"the lock keeper is unreachable: {exc}") from None
            finally:
                theirs.close()
            chan = (Connection(ours.detach()), self._generation)
        if cached is not None:
            cached[0].close()
        self._local.chan = chan
        return chan

    def _call(self, method: str, *args: Any) -> Any:
        return self._send(method, *args)()

    def _send(self, method: str, *args: Any) -> Callable[[], Any]:
        """Send one call; the returned function waits for its answer. Nothing else
        may be called from this thread in between (one channel per thread)."""
        chan, generation = self._channel()

        def gone() -> KeeperGone:
            self._local.chan = None
            chan.close()
            return KeeperGone(f"the lock keeper exited during {method}")

        try:
            chan.send((method, args))
        except (EOFError, OSError):
            raise gone() from None

        def answer() -> Any:
            try:
                ok, value = chan.recv()
            except (EOFError, OSError):
                raise gone() from None
            if not ok:
                raise value
            return value, generation

        return answer

    def _held(self, method: str, *args: Any) -> RemoteHeld:
        hid, generation = self._call(method, *args)
        return RemoteHeld(self, hid, generation)

    # The MountLocks interface (see locks.py for what each takes).

    def read(self, name: str, wal: bool) -> RemoteHeld:
        return self._held("read", name, wal)

    def exclusive(self, name: str, wal: bool, writers: bool = False) -> RemoteHeld:
        return self._held("exclusive", name, wal, writers)

    def request_exclusive(self, name: str, wal: bool) -> Callable[[], RemoteHeld]:
        """`exclusive`, asked for now; the returned function waits until it is held.

        A replica apply installs its LTX file while the keeper takes the locks
        (one round trip to the keeper off the replication lag). Every caller
        must call the function (and release what it returns), also on failure.
        """
        answer = self._send("exclusive", name, wal, False)

        def held() -> RemoteHeld:
            hid, generation = answer()
            return RemoteHeld(self, hid, generation)

        return held

    def writers(self, name: str, wal: bool, timeout: float, extend: Held | None = None) -> Held:
        if extend is not None:
            if not isinstance(extend, RemoteHeld) or extend.generation != self._generation:
                raise KeeperGone(f"the halt lock on {name} was lost with the lock keeper")
            self._call("writers", name, wal, timeout, extend.hid)
            return extend
        return self._held("writers", name, wal, timeout, None)

    def exclude_readers(self, name: str, wal: bool) -> RemoteHeld:
        return self._held("exclude_readers", name, wal)

    def reset_wal_index(self, name: str, page_size: int) -> None:
        self._call("reset_wal_index", name, page_size)

    def reset_and_release(self, held: Held, name: str, page_size: int) -> None:
        """reset_wal_index, then release `held`, in one round trip (released either way)."""
        if not isinstance(held, RemoteHeld) or not held.hid or held.generation != self._generation:
            try:
                self.reset_wal_index(name, page_size)
            finally:
                held.release()
            return
        hid, held.hid = held.hid, 0
        self._call("reset_and_release", hid, name, page_size)

    def release(self, hid: int, generation: int) -> None:
        if generation != self._generation:
            return  # that keeper is gone, and its locks with it
        try:
            self._call("release", hid)
        except KeeperGone:
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Tell the keeper to let go of the mount and exit; wait for it (worker thread)."""
        with self._guard:
            self._closed = True
            proc, control = self._proc, self._control
            self._proc = self._control = None
        if proc is None or control is None:
            return
        try:
            control.sendall(b"q")
            control.settimeout(timeout)
            control.recv(1)
        except OSError as exc:
            log.debug("lock keeper did not confirm shutdown: %s", exc)
        finally:
            control.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
