"""`litefspy import` and `export`: move a whole database through a node's `Data` service.

`--url` defaults to the local node (grpc.addr of fuse.yml, as for `status`).
Every failure is one line on stderr and exit code 1 (litefspy.cli.entry prints the
LitefspyError this module raises).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from litefspy.cli.common import add_url_args, node_url, remote_message
from litefspy.errors import DatabaseError, LitefspyError
from litefspy.progress import interval_from_env

# Longest an import or export may take end to end.
TRANSFER_TIMEOUT = 3600.0
# Without a terminal: a progress line on stderr at most this often.
PLAIN_INTERVAL = interval_from_env()
# How often the node is asked how its side of an import or export is going.
POLL_INTERVAL = max(0.1, min(1.0, PLAIN_INTERVAL))


class TransferProgress:
    """Bytes moved by the CLI: a tqdm bar on a terminal, a plain line on stderr
    every few seconds otherwise (so logs of scripted runs show progress too)."""

    def __init__(self, what: str, total: int, *, tty: bool | None = None) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.phase = ""
        self.started = time.monotonic()
        self._next_line = self.started + PLAIN_INTERVAL
        self._printed = False
        self._lock = threading.Lock()
        self.bar: Any = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)

    def update(self, n: int) -> None:
        """`n` more bytes moved."""
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            else:
                self._maybe_line()

    def node_phase(self, phase: str, done: int, total: int) -> None:
        """What the node reports about its side (import: checking, writing...)."""
        with self._lock:
            if self.bar is not None:
                if phase != self.phase:
                    self.bar.reset(total=total or None)
                    self.bar.set_description(f"{self.what}: {phase}")
                self.bar.n = done
                self.bar.refresh()
            else:
                if phase != self.phase:
                    self._next_line = 0.0  # say so at once
                self.total, self.done = total, done
            self.phase = phase
            if self.bar is None:
                self._maybe_line()

    def _maybe_line(self) -> None:
        now = time.monotonic()
        if now < self._next_line:
            return
        self._next_line = now + PLAIN_INTERVAL
        self._write_line(now)

    def _write_line(self, now: float) -> None:
        from litefspy.progress import format_bytes

        self._printed = True
        elapsed = max(now - self.started, 1e-9)
        line = f"{self.what}: "
        if self.phase:
            line += f"{self.phase}: "
        line += format_bytes(self.done)
        if self.total:
            line += f" of {format_bytes(self.total)} ({100 * self.done / self.total:.0f}%)"
        if not self.phase:
            line += f", {format_bytes(int(self.done / elapsed))}/s"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self, *, done: bool = False) -> None:
        """End the bar; without a terminal, a last line if any was printed
        (`done`: the work completed, whatever the last report said)."""
        if self.bar is not None:
            self.bar.close()
            return
        with self._lock:
            if done:
                self.done = max(self.done, self.total)
            if self._printed:
                self._write_line(time.monotonic())


class _NodeWatcher:
    """After an upload: polls the node's status for its side of the work."""

    def __init__(self, url: str, kind: str, name: str, progress: TransferProgress) -> None:
        self.url, self.kind, self.name, self.progress = url, kind, name, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=POLL_INTERVAL * 2)

    def _run(self) -> None:
        from litefspy.rpc.client import fetch_status
        from litefspy.rpc.errors import RemoteError

        while not self._stop.wait(POLL_INTERVAL):
            try:
                reply = fetch_status(self.url, timeout=POLL_INTERVAL * 2)
            except RemoteError:
                continue  # the transfer's own call reports real failures
            for work in reply.progress:
                if work.kind == self.kind and work.name == self.name:
                    phase = work.phase or "working"
                    self.progress.node_phase(phase, work.done_bytes, work.total_bytes)


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the top-level subparsers."""
    p = sub.add_parser("import", help="replace or create a database from a SQLite file (primary)")
    p.add_argument("--name", "-name", required=True, help="database name inside the mount")
    p.add_argument("path", metavar="PATH", help="SQLite database file to upload")
    add_url_args(p)
    p.set_defaults(handler=_cmd_import)

    p = sub.add_parser("export", help="write a consistent copy of a database to a file")
    p.add_argument("--name", "-name", required=True, help="database name inside the mount")
    p.add_argument("path", metavar="PATH", help="file to write (replaced if it exists)")
    add_url_args(p)
    p.set_defaults(handler=_cmd_export)


# --------------------------------------------------------------------- import


def _upload(
    path: Path, name: str, size: int, progress: TransferProgress, uploaded: _NodeWatcher
) -> Iterator[Any]:
    from litefspy.api.data import CHUNK_SIZE
    from litefspy.v1 import data_pb2 as pb

    yield pb.ImportRequest(start=pb.ImportStart(name=name, size=size))
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield pb.ImportRequest(data=chunk)
            progress.update(len(chunk))
    uploaded.start()


def _cmd_import(args: argparse.Namespace) -> int:
    from litefspy.api.data import IMPORT_METHOD
    from litefspy.progress import IMPORT
    from litefspy.rpc.client import call_client_stream
    from litefspy.rpc.errors import RemoteError
    from litefspy.store.files import validate_sqlite_file
    from litefspy.v1 import data_pb2 as pb

    name, path = args.name, Path(args.path)
    # Checked here too so that a wrong file fails at once, without an upload.
    try:
        validate_sqlite_file(path)
    except DatabaseError as exc:
        raise LitefspyError(f"cannot import {name}: {exc}") from None
    size = path.stat().st_size
    url = node_url(args)
    progress = TransferProgress(f"import {name}", size)
    watcher = _NodeWatcher(url, IMPORT, name, progress)
    ok = False
    try:
        reply = call_client_stream(
            url,
            IMPORT_METHOD,
            _upload(path, name, size, progress, watcher),
            request_type=pb.ImportRequest,
            response_type=pb.ImportReply,
            timeout=TRANSFER_TIMEOUT,
        )
        ok = True
    except RemoteError as exc:
        message = remote_message(exc, url)
        if not message.startswith(f"cannot import {name}"):
            message = f"cannot import {name}: {message}"
        raise LitefspyError(message) from None
    finally:
        watcher.stop()
        progress.close(done=ok)
    print(f"imported {path} as {reply.name}: txid {reply.txid:016x}/{reply.checksum:016x}")
    return 0


# --------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from litefspy.api.data import EXPORT_METHOD
    from litefspy.fsutil import fsync_dir
    from litefspy.progress import EXPORT
    from litefspy.rpc.client import call_server_stream
    from litefspy.rpc.errors import RemoteError
    from litefspy.v1 import data_pb2 as pb

    name, out = args.name, Path(args.path)
    url = node_url(args)
    if not out.parent.is_dir():
        raise LitefspyError(f"cannot export {name}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    start: Any = None
    written = 0
    # Until the copy starts arriving, the node is building it: say how far it got.
    progress = TransferProgress(f"export {name}", 0)
    watcher = _NodeWatcher(url, EXPORT, name, progress)
    watcher.start()
    ok = False
    try:
        with open(tmp, "wb") as f:
            try:
                request = pb.ExportRequest(name=name)
                chunks = call_server_stream(
                    url, EXPORT_METHOD, request, pb.ExportChunk, TRANSFER_TIMEOUT
                )
                for chunk in chunks:
                    if chunk.WhichOneof("part") == "start":
                        start = chunk.start
                        watcher.stop()
                        progress.node_phase("receiving", 0, start.size)
                    else:
                        n = f.write(chunk.data)
                        written += n
                        progress.update(n)
            except RemoteError as exc:
                message = remote_message(exc, url)
                if not message.startswith(f"cannot export {name}"):
                    message = f"cannot export {name}: {message}"
                raise LitefspyError(message) from None
            if start is None or written != start.size:
                expected = "?" if start is None else str(start.size)
                raise LitefspyError(
                    f"cannot export {name}: the node's stream ended after {written} of "
                    f"{expected} bytes"
                )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
        ok = True
    finally:
        watcher.stop()
        progress.close(done=ok)
        tmp.unlink(missing_ok=True)
    print(f"exported {name} to {out}: txid {start.txid:016x}/{start.checksum:016x}")
    return 0
