"""`litefspy run`: run a command on a node, after a handoff (--promote) or under a halt lock."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from litefspy.cli.common import add_url_args, command_after_dashes, node_url, remote_message
from litefspy.errors import LitefspyError

# How long `run --promote` lets the node take to become primary.
PROMOTE_TIMEOUT = 30.0


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the top-level subparsers."""
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


def _cmd_run(args: argparse.Namespace) -> int:
    from litefspy.rpc.client import call_unary, fetch_status
    from litefspy.rpc.methods import PROMOTE_METHOD
    from litefspy.supervisor import run_foreground
    from litefspy.v1 import admin_pb2

    command = command_after_dashes(args.command)
    if args.with_halt_lock_on and not command:
        sys.stderr.write("litefspy run: error: --with-halt-lock-on needs -- CMD\n")
        return 2
    if not command and not args.promote:
        sys.stderr.write("litefspy run: error: nothing to do: give --promote and/or -- CMD\n")
        return 2
    url = node_url(args)
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
    return run_foreground(command)


def _run_with_halt_lock(url: str, name: str, command: list[str]) -> int:
    """Run `command` while the node at `url` holds the halt lock on `name` (litefspy.api.halt)."""
    import threading

    from litefspy.api.halt import HOLD_METHOD
    from litefspy.rpc.client import CallHandle
    from litefspy.rpc.errors import RemoteError
    from litefspy.supervisor import run_foreground
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
            return run_foreground(command)
        finally:
            finished.set()
    finally:
        call.cancel()
