"""What several commands share: which node to talk to, the node's own error
message from a failed call, `-- CMD` handling and plain-text tables."""

from __future__ import annotations

import argparse

from litefspy.errors import ConfigError

FALLBACK_URL = "http://localhost:20202"


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


def node_url(args: argparse.Namespace) -> str:
    """The URL a command given `add_url_args` talks to."""
    return str(args.url or default_url(args.config))


def remote_message(exc: Exception, url: str) -> str:
    """The node's own message from a failed call, without the bridge's URL/code wrapping."""
    from litefspy.rpc.errors import RemoteError

    text = str(exc)
    if isinstance(exc, RemoteError):
        prefix, suffix = f"{url} failed the call: ", f" ({exc.code})"
        if text.startswith(prefix) and text.endswith(suffix):
            return text[len(prefix) : -len(suffix)]
    return text


def command_after_dashes(command: list[str]) -> list[str]:
    """The `CMD ARGS...` of an `argparse.REMAINDER` argument, without a leading `--`."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    return command


def text_table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Rows under a header, columns padded to their widest cell (CLI tables)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
