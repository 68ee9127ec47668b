"""Progress of long work (import, export, snapshot catch-up, startup check).

One `Progress` per piece of work: the worker calls `advance(n)` as bytes are
done (cheap: an addition and a clock read; a log line at most every
`LOG_INTERVAL` seconds), and `litefspy status` reads the `ProgressBoard` of
work in progress. It is plain Python with no trio, gRPC or FUSE in it, so the
store's worker threads and the trio side share it: `advance` runs in one
thread, readers only see integers and floats that Python updates atomically.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from litefspy.logs import kv

log = logging.getLogger(__name__)


def interval_from_env(default: float = 5.0) -> float:
    """`LITEFSPY_PROGRESS_INTERVAL` (seconds; tests shorten it), else `default`."""
    text = os.environ.get("LITEFSPY_PROGRESS_INTERVAL", "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value >= 0:
        log.warning(
            "ignoring LITEFSPY_PROGRESS_INTERVAL=%r: not a number of seconds; using %gs",
            text,
            default,
        )
        return default
    return value


# A progress log line at most this often per piece of work.
LOG_INTERVAL = interval_from_env()

# The kinds of long work, as status and the logs name them.
IMPORT = "import"
EXPORT = "export"
SNAPSHOT_SEND = "snapshot-send"
SNAPSHOT_RECEIVE = "snapshot-receive"
STARTUP_CHECK = "startup-check"


@dataclass(frozen=True)
class ProgressReport:
    """One piece of work at one moment (what status prints)."""

    kind: str
    name: str
    done_bytes: int
    total_bytes: int
    elapsed_s: float
    rate_bytes_per_s: float
    detail: str

    @property
    def fraction(self) -> float:
        """Done / total, 0 when the total is unknown."""
        return self.done_bytes / self.total_bytes if self.total_bytes > 0 else 0.0


class Progress:
    """Bytes done of a known total for one piece of work, logged every few seconds."""

    def __init__(
        self,
        kind: str,
        name: str,
        total: int,
        *,
        detail: str = "",
        log_interval: float = LOG_INTERVAL,
    ) -> None:
        self.kind = kind
        self.name = name
        self.total = max(0, total)
        self.detail = detail
        self.done = 0
        self.started = time.monotonic()
        self.log_interval = log_interval
        self._next_log = self.started + log_interval

    def advance(self, n: int) -> None:
        """`n` more bytes done (hot path: keep it this small)."""
        self.done += n
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + self.log_interval
            self._log("in progress", now)

    def set_detail(self, detail: str) -> None:
        """What the work is doing now (a phase: "verifying", "writing"...)."""
        self.detail = detail

    def next_phase(self, detail: str, total: int) -> None:
        """Start counting a new phase of the same work from 0 of `total` bytes."""
        self.detail = detail
        self.total = max(0, total)
        self.done = 0

    def report(self) -> ProgressReport:
        """A consistent copy for status."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = self.done
        return ProgressReport(
            kind=self.kind,
            name=self.name,
            done_bytes=done,
            total_bytes=self.total,
            elapsed_s=elapsed,
            rate_bytes_per_s=done / elapsed,
            detail=self.detail,
        )

    def finished(self) -> None:
        """Log the end of a piece of work that took at least one log interval."""
        now = time.monotonic()
        if now - self.started >= self.log_interval:
            self._log("done", now)

    def _log(self, what: str, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        percent = f"{100.0 * self.done / self.total:.1f}%" if self.total else "?"
        log.info(
            "%s %s %s",
            self.kind,
            what,
            kv(
                db=self.name,
                done=format_bytes(self.done),
                total=format_bytes(self.total),
                percent=percent,
                rate=f"{format_bytes(int(self.done / elapsed))}/s",
                elapsed=f"{elapsed:.1f}s",
                **({"phase": self.detail} if self.detail else {}),
            ),
        )


class ProgressBoard:
    """The work in progress on one node (status lists it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[Progress] = []

    @contextmanager
    def track(self, kind: str, name: str, total: int, *, detail: str = "") -> Iterator[Progress]:
        """A `Progress` listed on the board until the block ends (either way)."""
        progress = self.start(kind, name, total, detail=detail)
        try:
            yield progress
            progress.finished()
        finally:
            self.stop(progress)

    def start(self, kind: str, name: str, total: int, *, detail: str = "") -> Progress:
        """List a new piece of work (for work that spans calls; else use `track`)."""
        progress = Progress(kind, name, total, detail=detail)
        with self._lock:
            self._active.append(progress)
        return progress

    def stop(self, progress: Progress) -> None:
        """Remove a piece of work from the board (idempotent)."""
        with self._lock:
            if progress in self._active:
                self._active.remove(progress)

    def reports(self) -> list[ProgressReport]:
        """Every piece of work in progress, oldest first."""
        with self._lock:
            active = list(self._active)
        return [p.report() for p in active]


def format_bytes(n: int) -> str:
    """1536 -> '1.5KiB' (binary units, as `du -h`)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"  # pragma: no cover - loop returns


__all__ = [
    "EXPORT",
    "IMPORT",
    "SNAPSHOT_RECEIVE",
    "SNAPSHOT_SEND",
    "STARTUP_CHECK",
    "Progress",
    "ProgressBoard",
    "ProgressReport",
    "format_bytes",
]
