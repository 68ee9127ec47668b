"""Cluster commands that talk to a running node over gRPC: `litefspy status`, `run`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from litefspy.errors import ConfigError, LitefspyError

FALLBACK_URL = "http://localhost:20202"
# How long `run --promote` lets the node take to become primary.
PROMOTE_TIMEOUT = 30.0


def add_url_args(p: argparse.ArgumentParser) -> None:
    """`--url` and `-c/--config`: which node a command talks to (see default_url).

    `-url` and `-config` are LiteFS's spellings (`litefs import -url ...`), kept as aliases.
    """
    p.add_argument(
        "--url",
        "-url",
        help=f"the node's gRPC URL (default: grpc.addr of the local fuse.yml, else {FALLBACK_URL})",
    )
    p.add_argument(
        "-c", "--config", "-config", help="fuse.yml (or litefs.yml) to take the default --url from"
    )


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the top-level subparsers."""
    p = sub.add_parser("status", help="show a node's role, databases and replicas")
    add_url_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--watch",
        action="store_true",
        help="then follow the node's events, one JSON object per line (as `litefspy events`)",
    )
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser(
        "run",
        help="run a command on this node, optionally after making it the primary",
        description="Run CMD, optionally after the node at --url became the primary through "
        "a handoff from the current primary (--promote). Exits with CMD's code.",
    )
    add_url_args(p)
    # The single-dash spellings are LiteFS's (`litefs run -promote ...`), kept as aliases.
    p.add_argument(
        "--promote",
        "-promote",
        action="store_true",
        help="make the node the primary first (lease handoff)",
    )
    p.add_argument(
        "--if-candidate",
        "-if-candidate",
        action="store_true",
        help="do nothing (exit 0) unless the node is a candidate (lease.candidate: true)",
    )
    p.add_argument(
        "--with-halt-lock-on",
        "-with-halt-lock-on",
        metavar="DB",
        help="on a replica: pause the primary's writers of DB and let CMD write to DB here; "
        "each transaction is applied by the primary before it completes (write forwarding)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(handler=_cmd_run)


def default_url(config_path: str | None = None) -> str:
    """`http://` + grpc.addr of the local fuse.yml if there is one, else the default port."""
    from litefspy.config import find_config_path, load_config

    try:
        path = find_config_path(config_path)
    except ConfigError:
        if config_path is not None:
            raise
        return FALLBACK_URL
    return f"http://{load_config(path).grpc.client_address}"


def _cmd_run(args: argparse.Namespace) -> int:
    from litefspy.rpc.client import call_unary, fetch_status
    from litefspy.rpc.methods import PROMOTE_METHOD
    from litefspy.v1 import admin_pb2

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.with_halt_lock_on and not command:
        sys.stderr.write("litefspy run: error: --with-halt-lock-on needs -- CMD\n")
        return 2
    if not command and not args.promote:
        sys.stderr.write("litefspy run: error: nothing to do: give --promote and/or -- CMD\n")
        return 2
    url = args.url or default_url(args.config)
    if args.if_candidate and not fetch_status(url).candidate:
        sys.stderr.write(f"litefspy: {url} is not a candidate; not running the command\n")
        return 0
    if args.promote:
        reply = call_unary(
            url,
            PROMOTE_METHOD,
            admin_pb2.PromoteRequest(timeout_seconds=PROMOTE_TIMEOUT),
            admin_pb2.PromoteReply,
            timeout=PROMOTE_TIMEOUT + 5,
        )
        if reply.already_primary:
            sys.stderr.write(f"litefspy: {url} is already the primary (epoch {reply.epoch})\n")
        else:
            sys.stderr.write(
                f"litefspy: {url} is now the primary (epoch {reply.epoch}, "
                f"handed over by {reply.previous_primary or 'the old primary'})\n"
            )
    if not command:
        return 0
    if args.with_halt_lock_on:
        return _run_with_halt_lock(url, args.with_halt_lock_on, command)
    return _run_command(command)


def _run_command(command: list[str]) -> int:
    try:
        proc = subprocess.run(command, check=False)
    except OSError as exc:
        raise LitefspyError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _run_with_halt_lock(url: str, name: str, command: list[str]) -> int:
    """Run `command` while the node at `url` holds the halt lock on `name` (litefspy.api.halt)."""
    import threading

    from litefspy.api.halt import HOLD_METHOD
    from litefspy.cli_data import remote_message
    from litefspy.rpc.client import CallHandle
    from litefspy.rpc.errors import RemoteError
    from litefspy.v1 import halt_pb2

    call = CallHandle(url, HOLD_METHOD, halt_pb2.HoldRequest(name=name), halt_pb2.HoldEvent)
    try:
        events = iter(call)
        try:
            first = next(events)
        except RemoteError as exc:
            raise LitefspyError(remote_message(exc, url)) from None
        except StopIteration:
            raise LitefspyError(f"{url} ended the halt lock call without an answer") from None
        got = first.acquired
        if got.on_primary:
            sys.stderr.write(f"litefspy: {got.primary} is the primary; {name} is writable there\n")
        else:
            sys.stderr.write(
                f"litefspy: halt lock on {name} held: the primary {got.primary} paused its "
                f"writers at txid {got.txid:016x}; writes are forwarded to it\n"
            )
        finished = threading.Event()

        def watch() -> None:
            reason = "the node ended the halt lock"
            try:
                for event in events:
                    if event.WhichOneof("event") == "lost":
                        reason = event.lost.reason
                        break
            except RemoteError as exc:
                reason = remote_message(exc, url)
            if not finished.is_set():
                sys.stderr.write(f"litefspy: {reason}; writes to {name} now fail on this node\n")

        threading.Thread(target=watch, name="halt lock", daemon=True).start()
        try:
            return _run_command(command)
        finally:
            finished.set()
    finally:
        call.cancel()


def _cmd_status(args: argparse.Namespace) -> int:
    from litefspy.rpc.client import fetch_status
    from litefspy.rpc.convert import status_to_dict

    url = args.url or default_url(args.config)
    status = status_to_dict(fetch_status(url))
    if args.watch:
        # Events already start with the state of every database (`init`): the
        # status object comes first, on one line, so the output stays NDJSON.
        from litefspy.cli_data import follow_events

        print(json.dumps(status), flush=True)
        return follow_events(url)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


def text_table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Rows under a header, columns padded to their widest cell (CLI tables)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _replication_error(repl: dict[str, Any]) -> str:
    """The replica's last stream error, as current or (once reconnected since) as past."""
    if not repl.get("last_error"):
        return ""
    ago = _ago(repl.get("last_error_age_ms"))
    if repl.get("last_error_healed"):
        return f"; no error since connecting (the last one, {ago}: {repl['last_error']})"
    return f"; last error {ago}: {repl['last_error']}"


def _ago(ms: int | None) -> str:
    """`12 s ago`, `3 min ago`, ... for a past event's age in milliseconds."""
    if ms is None:
        return "(when unknown)"
    seconds = ms // 1000
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _progress_row(p: dict[str, Any]) -> list[str]:
    from litefspy.progress import format_bytes

    done = format_bytes(p["done_bytes"])
    if p["total_bytes"]:
        done += f" of {format_bytes(p['total_bytes'])} ({p['percent']:.0f}%)"
    return [
        p["kind"],
        p["name"],
        done,
        f"{format_bytes(p['rate_bytes_per_second'])}/s",
        p.get("phase") or "",
    ]


def render_status(status: dict[str, Any]) -> str:
    """The human-readable form of `status --json`."""
    node, lease, primary = status["node"], status["lease"], status["primary"]
    lines = [
        f"node:     {node['hostname']} ({node['id']}) {node['advertise_url']}",
        f"role:     {status['role']}",
        "primary:  "
        + (f"{primary['hostname']} {primary['advertise_url']}" if primary else "(not connected)"),
        f"lease:    {lease['type']} epoch {lease['epoch']}"
        + (f", held by {lease['holder']}" if lease.get("holder") else "")
        + (
            f", expires in {lease['expires_in_ms']} ms"
            if lease.get("expires_in_ms") is not None
            else ""
        ),
        f"cluster:  {status.get('cluster_id') or '-'}",
        "ready:    "
        + ("true" if status.get("ready", True) else f"false ({status.get('not_ready_reason')})"),
    ]
    repl = status.get("replication")
    if repl:
        state = "caught up" if repl["ready"] else "connected" if repl["connected"] else "offline"
        lines.append(
            f"sync:     {state}; {repl['files_applied']} files "
            f"({repl['snapshots_applied']} snapshots) applied, {repl['apply_errors']} errors"
            + _replication_error(repl)
        )
    work = status.get("progress") or []
    if work:
        lines.append("")
        lines += text_table(
            [_progress_row(p) for p in work], ["WORK", "DATABASE", "DONE", "RATE", "PHASE"]
        )
    lines.append("")
    if status["databases"]:
        rows = [
            [
                d["name"],
                d["txid"],
                d["checksum"],
                (d["journal_mode"] if d.get("exists", True) else "(deleted)")
                + (f", halt lock: {d['halt_holder']}" if d.get("halt_holder") else ""),
                str(d["size_bytes"]),
                str(d["lag_ms"]),
            ]
            for d in status["databases"]
        ]
        lines += text_table(rows, ["DATABASE", "TXID", "CHECKSUM", "MODE", "SIZE", "LAG_MS"])
    else:
        lines.append("no databases")
    backup = status.get("backup")
    if backup:
        lines.append("")
        if not backup["uploading"]:
            lines.append(f"backup:   {backup['target']} (the primary uploads)")
        else:
            lines.append(
                f"backup:   {backup['target']}; {backup['objects_uploaded']} objects, "
                f"{backup['bytes_uploaded']} bytes uploaded, {backup['errors']} errors"
            )
            rows = [
                [
                    d["name"],
                    d["uploaded_txid"],
                    str(d["lag_txids"]),
                    str(d["lag_ms"]),
                    f"{_ago(d['last_error_age_ms'])}: {d['last_error']}" if d["last_error"] else "",
                ]
                for d in backup["databases"]
            ]
            if rows:
                lines += text_table(
                    rows, ["DATABASE", "UPLOADED", "BEHIND_TXIDS", "BEHIND_MS", "LAST ERROR"]
                )
    if status["role"] == "primary":
        lines.append("")
        if status["replicas"]:
            rows = [
                [
                    r["hostname"],
                    r["node"],
                    d["name"],
                    d["txid"],
                ]
                for r in status["replicas"]
                for d in (r["databases"] or [{"name": "-", "txid": "-"}])
            ]
            lines += text_table(rows, ["REPLICA", "NODE", "DATABASE", "TXID"])
        else:
            lines.append("no replicas connected")
    return "\n".join(lines)
