"""The `litefspy` command line: parses arguments and dispatches to one module per command.

Exit codes: 0 success, 1 failure (one-line message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from litefspy import __version__
from litefspy.errors import LitefspyError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _cmd_version(_args: argparse.Namespace) -> int:
    print(f"litefspy {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser; each subcommand module registers its own arguments."""
    from litefspy.cli import aside, backup, cluster, data, ltx, mount, status

    parser = _Parser(prog="litefspy", description="Replicated SQLite through FUSE.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=_cmd_version)
    mount.add_parsers(sub)
    status.add_parsers(sub)
    cluster.add_parsers(sub)
    ltx.add_parsers(sub)
    data.add_parsers(sub)
    backup.add_parsers(sub)
    aside.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except LitefspyError as exc:
        sys.stderr.write(f"litefspy: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        sys.stderr.write(f"litefspy: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
