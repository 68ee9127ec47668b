"""`litefspy mount`: load fuse.yml, run the node until stopped."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from litefspy import logs


def add_parsers(sub: Any) -> None:
    """Register `mount`."""
    p = sub.add_parser("mount", help="mount the FUSE filesystem and run the node")
    p.add_argument("-c", "--config", help="path to fuse.yml")
    p.add_argument("--no-expand-env", action="store_true", help="do not expand ${VAR}")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS... run once ready")
    p.set_defaults(handler=_cmd_mount)


def _cmd_mount(args: argparse.Namespace) -> int:
    from litefspy.config import load_config
    from litefspy.fuse.mount import check_can_mount
    from litefspy.node import Node

    config = load_config(args.config, expand_env=not args.no_expand_env)
    check_can_mount(mountpoint=Path(config.fuse.dir))
    logs.setup(config.log.format, config.log.debug)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    node = Node(config)
    return trio.run(node.run, command or None)
