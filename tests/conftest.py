"""Shared fixtures."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nodes import NodeHung, NodeProcess

# Tiers: a test's folder says what it needs, and marks it (`pytest -m unit`, or
# `make test-fast` for the tiers without a mount or a node process).
TIERS = {
    "unit": "pure code, real sockets at most: no mount, no node process",
    "store": "real SQLite driving the store through a VFS: no mount",
    "fs": "one FUSE mount (in-process or one node)",
    "cluster": "node processes talking gRPC, etcd, an object store",
    "faults": "kills, partitions, crashes, full disks",
}


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {what}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        tier = Path(str(item.path)).resolve().relative_to(here).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in a tier folder: {set(TIERS)}")
        item.add_marker(getattr(pytest.mark, tier))


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
