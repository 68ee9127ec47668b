"""`litefspy restore` and `litefspy backup list`: read a backup directly (no node needed).

The backup URL is the one fuse.yml names in `backup.url`; for S3 the
endpoint, region and path style ride along as query parameters
(`s3://bucket/prefix?endpoint=http://host:port&region=R&force-path-style=true`),
credentials come from the AWS_* environment. Failures are one line (exit 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from litefspy.errors import BackupError


def add_parsers(sub: Any) -> None:
    """Register `restore` and `backup list`."""
    p = sub.add_parser("restore", help="restore a database from a backup (point in time)")
    p.add_argument("--url", required=True, help="backup URL (file:///path or s3://bucket/prefix)")
    p.add_argument("--db", required=True, help="database name")
    p.add_argument("-o", "--output", required=True, help="file to write")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--txid", help="restore this TXID (hex, as in NAME-pos); default: latest")
    when.add_argument("--timestamp", help="restore the state at this time (RFC 3339)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(handler=_cmd_restore)

    b = sub.add_parser("backup", help="inspect backups")
    bsub = b.add_subparsers(dest="backup_command", metavar="COMMAND")
    bsub.required = True
    ls = bsub.add_parser("list", help="each database's restorable range and branches")
    ls.add_argument("--url", required=True, help="backup URL")
    ls.add_argument("--db", help="only this database")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(handler=_cmd_list)


def _target(url: str) -> Any:
    from litefspy.backup.target import Target
    from litefspy.config import parse_target

    return Target(parse_target(url))


def parse_timestamp(text: str) -> int:
    """RFC 3339 (or ISO 8601 with an offset) to Unix milliseconds."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BackupError(f"--timestamp {text!r} is not an RFC 3339 time") from None
    if when.tzinfo is None:
        raise BackupError(f"--timestamp {text!r} needs a time zone (e.g. Z or +02:00)")
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    if not ms:
        return "-"
    stamp = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Progress:
    """Bytes downloaded: a bar on a terminal (tqdm), nothing otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None

    def plan(self, pieces: list[Any]) -> None:
        if not sys.stderr.isatty():
            return
        from tqdm import tqdm

        total = sum(p.size for p in pieces)
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=f"{len(pieces)} objects", leave=False
        )

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_restore(args: argparse.Namespace) -> int:
    from litefspy.backup.restore import restore_database

    txid = None
    if args.txid is not None:
        try:
            txid = int(args.txid, 16)
        except ValueError:
            raise BackupError(f"--txid {args.txid!r} is not a hex TXID") from None
    timestamp = parse_timestamp(args.timestamp) if args.timestamp else None
    progress = _Progress()
    try:
        result = restore_database(
            _target(args.url),
            args.db,
            Path(args.output),
            txid=txid,
            timestamp_ms=timestamp,
            force=args.force,
            progress=progress,
            on_plan=progress.plan,
        )
    finally:
        progress.close()
    print(
        f"restored {args.db} to TXID {result.txid:016x} (checksum {result.checksum:016x}) "
        f"from {result.files} objects, {result.bytes} bytes, into {args.output}"
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from litefspy.backup.restore import describe, list_databases

    target = _target(args.url)
    names = [args.db] if args.db else list_databases(target)
    rows = [describe(target, name) for name in names]
    if args.db and not rows[0].objects:
        raise BackupError(f"backup {target.spec.display} has no database {args.db!r}")
    if args.json:
        out = [
            {
                "name": r.name,
                "oldest": {"txid": f"{r.oldest_txid:016x}", "time": _iso(r.oldest_ms)},
                "newest": {"txid": f"{r.newest_txid:016x}", "time": _iso(r.newest_ms)},
                "deleted": (
                    {"txid": f"{r.deleted.max_txid:016x}", "time": _iso(r.deleted.timestamp_ms)}
                    if r.deleted
                    else None
                ),
                "objects": r.objects,
                "bytes": r.bytes,
                "branches": [
                    {
                        "epoch": p.epoch,
                        "min_txid": f"{p.min_txid:016x}",
                        "max_txid": f"{p.max_txid:016x}",
                        "time": _iso(p.timestamp_ms),
                        "key": p.key,
                    }
                    for p in r.branches
                ],
            }
            for r in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    if not rows:
        print(f"no databases in {target.spec.display}")
        return 0
    for r in rows:
        if r.deleted is not None:
            gone = r.deleted
            earlier = (
                f"restorable before that: TXID {r.oldest_txid:016x} ({_iso(r.oldest_ms)}) .. "
                f"{gone.min_txid - 1:016x}"
                if 0 < r.oldest_txid < gone.min_txid
                else "nothing earlier is kept"
            )
            print(
                f"{r.name}: deleted at {_iso(gone.timestamp_ms)} (TXID {gone.max_txid:016x}); "
                f"{earlier}; {r.objects} objects, {r.bytes} bytes"
            )
        else:
            print(
                f"{r.name}: TXID {r.oldest_txid:016x} ({_iso(r.oldest_ms)}) .. "
                f"{r.newest_txid:016x} ({_iso(r.newest_ms)}); {r.objects} objects, {r.bytes} bytes"
            )
        for p in r.branches:
            print(
                f"  branch (epoch {p.epoch}): TXID {p.min_txid:016x}..{p.max_txid:016x} "
                f"({_iso(p.timestamp_ms)}), not restorable: {p.key}"
            )
    return 0
