"""Placeholder: registers no subcommands yet (filled in by its own change)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    """Register this module's subcommands on the top-level subparsers."""
    del sub


def _unused(_args: argparse.Namespace) -> int:
    return 0
