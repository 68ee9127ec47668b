"""`litefspy mount`: load fuse.yml, run the node until stopped."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import trio

from litefspy import logs
from litefspy.cli.common import command_after_dashes

log = logging.getLogger(__name__)


def add_parsers(sub: Any) -> None:
    """Register `mount`."""
    p = sub.add_parser("mount", help="mount the FUSE filesystem and run the node")
    # `-config` is LiteFS's spelling (Go flags take one dash), accepted as an alias.
    p.add_argument("-c", "--config", "-config", help="path to fuse.yml (or litefs.yml)")
    p.add_argument("--no-expand-env", action="store_true", help="do not expand ${VAR}")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS... run once ready")
    p.set_defaults(handler=_cmd_mount)


def _cmd_mount(args: argparse.Namespace) -> int:
    from litefspy.config import load_config

    # The config first: a mistake in it is reported before the heavy imports.
    config = load_config(args.config, expand_env=not args.no_expand_env)
    from litefspy.fuse.mount import check_can_mount
    from litefspy.node import Node

    check_can_mount(mountpoint=Path(config.fuse.dir))
    logs.setup(config.log.format, config.log.debug)
    for warning in config.warnings:
        log.warning("%s", warning)
    command = command_after_dashes(args.command)
    node = Node(config)
    return trio.run(node.run, command or None)
