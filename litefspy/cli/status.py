"""`litefspy status` and `events`: what a running node says about itself."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from litefspy.cli.common import add_url_args, node_url, remote_message, text_table
from litefspy.errors import LitefspyError


def add_parsers(sub: Any) -> None:
    """Register `status` and `events`."""
    p = sub.add_parser("status", help="show a node's role, databases and replicas")
    add_url_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--watch",
        action="store_true",
        help="then follow the node's events, one JSON object per line (as `litefspy events`)",
    )
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("events", help="print a node's events, one JSON object per line")
    add_url_args(p)
    p.set_defaults(handler=_cmd_events)


def _cmd_status(args: argparse.Namespace) -> int:
    from litefspy.rpc.client import fetch_status
    from litefspy.rpc.convert import status_to_dict

    url = node_url(args)
    status = status_to_dict(fetch_status(url))
    if args.watch:
        # Events already start with the state of every database (`init`): the
        # status object comes first, on one line, so the output stays NDJSON.
        print(json.dumps(status), flush=True)
        return follow_events(url)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


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


def _cmd_events(args: argparse.Namespace) -> int:
    return follow_events(node_url(args))


def follow_events(url: str) -> int:
    """Print the node's events as NDJSON until it ends the stream (an error) or Ctrl-C."""
    from litefspy.api.events import EVENTS_METHOD, event_to_json
    from litefspy.rpc.client import call_server_stream
    from litefspy.rpc.errors import RemoteError
    from litefspy.v1 import data_pb2 as pb

    try:
        for event in call_server_stream(url, EVENTS_METHOD, pb.EventsRequest(), pb.Event, None):
            sys.stdout.write(json.dumps(event_to_json(event)) + "\n")
            sys.stdout.flush()
    except RemoteError as exc:
        raise LitefspyError(f"events: {remote_message(exc, url)}") from None
    raise LitefspyError(f"events: the node at {url} ended the stream")
