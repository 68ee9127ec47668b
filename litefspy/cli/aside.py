"""`litefspy aside list|prune`: what litefspy set aside instead of deleting.

Works on the data directory itself (from `--data-dir`, or `data.dir` of the
fuse.yml), whether the node runs or not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from litefspy.cli.common import text_table
from litefspy.errors import ConfigError, LitefspyError


def add_parsers(sub: Any) -> None:
    """Register `aside list` and `aside prune`."""
    p = sub.add_parser(
        "aside",
        help="list or prune what litefspy set aside (diverged replica histories, WAL frames)",
    )
    actions = p.add_subparsers(dest="aside_command", metavar="ACTION", parser_class=type(p))
    actions.required = True

    lst = actions.add_parser("list", help="list every aside-* directory and wal.aside-* file")
    _add_common(lst)
    lst.add_argument("--json", action="store_true", help="print one JSON array")
    lst.set_defaults(handler=_cmd_list)

    prune = actions.add_parser(
        "prune",
        help="delete asides (all, or those older than --older-than)",
        description="Delete set-aside histories and WAL files. Safe while the node runs; "
        "asides younger than a minute (maybe still being written) are kept.",
    )
    _add_common(prune)
    prune.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_duration,
        default=0.0,
        help="only those set aside longer ago than this (e.g. 72h, 30m; default: all)",
    )
    prune.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    prune.set_defaults(handler=_cmd_prune)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="NAME", help="only this database's")
    p.add_argument("--data-dir", help="the node's data.dir (default: data.dir of fuse.yml)")
    p.add_argument("-c", "--config", help="fuse.yml to take data.dir from")


def _duration(text: str) -> float:
    from litefspy.config import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _data_dir(args: argparse.Namespace) -> Path:
    from litefspy.config import find_config_path, load_config

    if args.data_dir:
        data = Path(args.data_dir)
    else:
        data = Path(load_config(find_config_path(args.config)).data.dir)
    if not (data / "dbs").is_dir():
        raise LitefspyError(f"{data} is not a litefspy data.dir (it has no dbs/ directory)")
    if args.name is not None and not (data / "dbs" / args.name).is_dir():
        raise LitefspyError(f"no database named {args.name} in {data}")
    return data


def _cmd_list(args: argparse.Namespace) -> int:
    from litefspy.store.aside import find_asides

    data = _data_dir(args)
    asides = find_asides(data, args.name)
    now = time.time()
    if args.json:
        out = [
            {
                "db": a.db,
                "kind": a.kind,
                "path": str(a.path.relative_to(data)),
                "created": _iso(a.created),
                "age_seconds": int(a.age(now)),
                "size_bytes": a.size,
            }
            for a in asides
        ]
        print(json.dumps(out))
        return 0
    if not asides:
        print("nothing set aside")
        return 0
    rows = [
        [a.db, a.kind, _iso(a.created), _age(a.age(now)), str(a.size), _rel(a.path, data)]
        for a in asides
    ]
    print("\n".join(text_table(rows, ["DATABASE", "KIND", "SET ASIDE", "AGE", "SIZE", "PATH"])))
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from litefspy.store.aside import MIN_PRUNE_AGE, find_asides, remove_aside

    data = _data_dir(args)
    now = time.time()
    removed = kept_young = 0
    freed = 0
    for a in find_asides(data, args.name):
        age = a.age(now)
        if age < args.older_than:
            continue
        if age < MIN_PRUNE_AGE:
            kept_young += 1
            continue
        where = a.path.relative_to(data)
        if args.dry_run:
            print(f"would remove {where} ({a.size} bytes, set aside {_age(age)} ago)")
        else:
            try:
                remove_aside(a)
            except OSError as exc:
                sys.stderr.write(f"litefspy: cannot remove {a.path}: {exc.strerror}\n")
                return 1
            print(f"removed {where} ({a.size} bytes, set aside {_age(age)} ago)")
        removed += 1
        freed += a.size
    verb = "would remove" if args.dry_run else "removed"
    summary = f"{verb} {removed} aside{'s' if removed != 1 else ''}, {freed} bytes"
    if kept_young:
        summary += f"; kept {kept_young} set aside less than {MIN_PRUNE_AGE:g} s ago"
    print(summary)
    return 0


def _rel(path: Path, data: Path) -> str:
    return str(path.relative_to(data))


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"
