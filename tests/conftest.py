"""Shared fixtures."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import NodeHung, NodeProcess


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    """Create node processes; every one is stopped (and unmounted) at teardown."""
    nodes: list[NodeProcess] = []

    def make(name: str = "node", **kwargs) -> NodeProcess:
        n = NodeProcess(tmp_path, name, **kwargs)
        nodes.append(n)
        return n

    yield make
    hung: list[BaseException] = []
    for n in nodes:
        try:
            n.stop()
        except NodeHung as exc:
            hung.append(exc)
    if hung:
        raise hung[0]


# pytest-timeout's SIGALRM cannot interrupt a test thread stuck in the kernel
# (e.g. waiting on a FUSE request). This backstop can: past it, the stacks of
# every thread are printed and the run exits non-zero instead of hanging.
BACKSTOP_SECONDS = 330


@pytest.fixture(autouse=True)
def _hang_backstop() -> Iterator[None]:
    faulthandler.dump_traceback_later(BACKSTOP_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    """One started single node (static lease, primary)."""
    return node_factory().start()
