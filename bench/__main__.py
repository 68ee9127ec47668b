"""Run the registered benchmarks, print a table, write the rows as JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import BENCHMARKS, Row

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
_COLUMNS = ("benchmark", "workload", "figure", "value", "unit")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def print_table(rows: list[Row]) -> None:
    """Fixed columns first, any extra keys of a row as `key=value` notes."""
    cells = [[_fmt(r.get(c, "")) for c in _COLUMNS] for r in rows]
    notes = [" ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in _COLUMNS) for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(_COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)) + "  notes")
    for row, note in zip(cells, notes, strict=True):
        line = "  ".join(
            cell.rjust(w) if i == 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        print(f"{line}  {note}".rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        help="run only this benchmark (repeatable); default: all",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write rows")
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    rows: list[Row] = []
    started = time.time()
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        for row in BENCHMARKS[name]():
            rows.append({"benchmark": name, **row})
        print(f"  {name} took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print_table(rows)
    report = {
        "started": dt.datetime.fromtimestamp(started, tz=dt.UTC).isoformat(),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
