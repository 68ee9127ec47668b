"""Cluster commands that talk to a running node over gRPC: `litefspy status`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from litefspy.errors import ConfigError

FALLBACK_URL = "http://localhost:20202"


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the top-level subparsers."""
    p = sub.add_parser("status", help="show a node's role, databases and replicas")
    p.add_argument(
        "--url",
        help=f"the node's gRPC URL (default: grpc.addr of the local fuse.yml, else {FALLBACK_URL})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-c", "--config", help="fuse.yml to take the default --url from")
    p.set_defaults(handler=_cmd_status)


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


def _cmd_status(args: argparse.Namespace) -> int:
    from litefspy.replication.bridge import fetch_status
    from litefspy.replication.status import status_to_dict

    url = args.url or default_url(args.config)
    status = status_to_dict(fetch_status(url))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
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
        + (
            f", expires in {lease['expires_in_ms']} ms"
            if lease.get("expires_in_ms") is not None
            else ""
        ),
        f"cluster:  {status.get('cluster_id') or '-'}",
    ]
    repl = status.get("replication")
    if repl:
        state = "caught up" if repl["ready"] else "connected" if repl["connected"] else "offline"
        lines.append(
            f"sync:     {state}; {repl['files_applied']} files "
            f"({repl['snapshots_applied']} snapshots) applied, {repl['apply_errors']} errors"
            + (f"; last error: {repl['last_error']}" if repl.get("last_error") else "")
        )
    lines.append("")
    if status["databases"]:
        rows = [
            [
                d["name"],
                d["txid"],
                d["checksum"],
                d["journal_mode"] if d.get("exists", True) else "(deleted)",
                str(d["size_bytes"]),
                str(d["lag_ms"]),
            ]
            for d in status["databases"]
        ]
        lines += _table(rows, ["DATABASE", "TXID", "CHECKSUM", "MODE", "SIZE", "LAG_MS"])
    else:
        lines.append("no databases")
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
            lines += _table(rows, ["REPLICA", "NODE", "DATABASE", "TXID"])
        else:
            lines.append("no replicas connected")
    return "\n".join(lines)
