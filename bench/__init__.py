"""litefspy benchmarks: `python -m bench [--only NAME] [--json PATH]`.

BENCHMARKS maps a name to a zero-argument function returning result rows
(dicts with at least workload, figure, value, unit).  Modules are imported only
when their benchmark runs, so one module's heavy dependencies (a mount, a
cluster) never slow down or break the others.  To add one, write
`bench/NAME.py` with `run() -> list[Row]` and add a line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]
Benchmark = Callable[[], list[Row]]


def _lazy(module: str) -> Benchmark:
    def run() -> list[Row]:
        rows: list[Row] = importlib.import_module(module).run()
        return rows

    run.__doc__ = f"run() of {module}"
    return run


BENCHMARKS: dict[str, Benchmark] = {
    "backup": _lazy("bench.backup"),
    "codec": _lazy("bench.codec"),
    "failover": _lazy("bench.failover"),
    "fs": _lazy("bench.fs"),
    "fusereq": _lazy("bench.fusereq"),
    "replication": _lazy("bench.replication"),
    "startup": _lazy("bench.startup"),
}
