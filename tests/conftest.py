"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import NodeProcess


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    """Create node processes; every one is stopped (and unmounted) at teardown."""
    nodes: list[NodeProcess] = []

    def make(name: str = "node", **kwargs) -> NodeProcess:
        n = NodeProcess(tmp_path, name, **kwargs)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    """One started single node (static lease, primary)."""
    return node_factory().start()
