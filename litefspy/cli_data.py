"""`litefspy import`, `export` and `events`: talk to a node's `Data` service.

`--url` defaults to the local node (grpc.addr of fuse.yml, as for `status`).
Every failure is one line on stderr and exit code 1 (litefspy.cli prints the
LitefspyError this module raises).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from litefspy.errors import DatabaseError, LitefspyError

# Longest an import or export may take end to end.
TRANSFER_TIMEOUT = 3600.0


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the top-level subparsers."""
    from litefspy.cli_cluster import add_url_args

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

    p = sub.add_parser("events", help="print a node's events, one JSON object per line")
    add_url_args(p)
    p.set_defaults(handler=_cmd_events)


def _url(args: argparse.Namespace) -> str:
    from litefspy.cli_cluster import default_url

    return str(args.url or default_url(args.config))


def remote_message(exc: Exception, url: str) -> str:
    """The node's own message from a failed call, without the bridge's URL/code wrapping."""
    from litefspy.replication.bridge import RemoteError

    text = str(exc)
    if isinstance(exc, RemoteError):
        prefix, suffix = f"{url} failed the call: ", f" ({exc.code})"
        if text.startswith(prefix) and text.endswith(suffix):
            return text[len(prefix) : -len(suffix)]
    return text


# --------------------------------------------------------------------- import


def _upload(path: Path, name: str, size: int) -> Iterator[Any]:
    from litefspy.dataservice import CHUNK_SIZE
    from litefspy.v1 import data_pb2 as pb

    yield pb.ImportRequest(start=pb.ImportStart(name=name, size=size))
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield pb.ImportRequest(data=chunk)


def _cmd_import(args: argparse.Namespace) -> int:
    from litefspy.dataservice import IMPORT_METHOD
    from litefspy.replication.bridge import RemoteError, call_client_stream
    from litefspy.store.store import validate_sqlite_file
    from litefspy.v1 import data_pb2 as pb

    name, path = args.name, Path(args.path)
    # Checked here too so that a wrong file fails at once, without an upload.
    try:
        validate_sqlite_file(path)
    except DatabaseError as exc:
        raise LitefspyError(f"cannot import {name}: {exc}") from None
    size = path.stat().st_size
    url = _url(args)
    try:
        reply = call_client_stream(
            url,
            IMPORT_METHOD,
            _upload(path, name, size),
            request_type=pb.ImportRequest,
            response_type=pb.ImportReply,
            timeout=TRANSFER_TIMEOUT,
        )
    except RemoteError as exc:
        message = remote_message(exc, url)
        if not message.startswith(f"cannot import {name}"):
            message = f"cannot import {name}: {message}"
        raise LitefspyError(message) from None
    print(f"imported {path} as {reply.name}: txid {reply.txid:016x}/{reply.checksum:016x}")
    return 0


# --------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from litefspy.dataservice import EXPORT_METHOD
    from litefspy.ltx.files import fsync_dir
    from litefspy.replication.bridge import RemoteError, call_server_stream
    from litefspy.v1 import data_pb2 as pb

    name, out = args.name, Path(args.path)
    url = _url(args)
    if not out.parent.is_dir():
        raise LitefspyError(f"cannot export {name}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    start: Any = None
    written = 0
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
                    else:
                        written += f.write(chunk.data)
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
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {name} to {out}: txid {start.txid:016x}/{start.checksum:016x}")
    return 0


# --------------------------------------------------------------------- events


def _cmd_events(args: argparse.Namespace) -> int:
    return follow_events(_url(args))


def follow_events(url: str) -> int:
    """Print the node's events as NDJSON until it ends the stream (an error) or Ctrl-C."""
    from litefspy.events import EVENTS_METHOD, event_to_json
    from litefspy.replication.bridge import RemoteError, call_server_stream
    from litefspy.v1 import data_pb2 as pb

    try:
        for event in call_server_stream(url, EVENTS_METHOD, pb.EventsRequest(), pb.Event, None):
            sys.stdout.write(json.dumps(event_to_json(event)) + "\n")
            sys.stdout.flush()
    except RemoteError as exc:
        raise LitefspyError(f"events: {remote_message(exc, url)}") from None
    raise LitefspyError(f"events: the node at {url} ended the stream")
