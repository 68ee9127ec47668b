"""LTX merging for backups, in a separate process.

Merging decodes, checksums and re-encodes every page of every file in a sync
interval (hundreds of small files a second under load). Run in a thread of
the node, that work holds the GIL against the FUSE loop and halved the
node's commit rate in WAL/NORMAL (bench W9); in a process of its own it runs
on another core and the FUSE loop never waits for it. The worker is started
on first use with the `spawn` method (never `fork` in a threaded, mounted
process) and inherits no descriptor of the node's; it exits when the node does.
It runs at a lower CPU priority than the node (WORKER_NICENESS).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from litefspy.errors import BackupError
from litefspy.ltx.decoder import verify_file
from litefspy.ltx.format import Header, Trailer
from litefspy.ltx.merge import merge_files


def merge_to_file(paths: list[Path], out: Path, tmp_dir: Path) -> tuple[Header, Trailer]:
    """Merge `paths` into the file `out` and verify it (removed if anything fails)."""
    try:
        with open(out, "wb") as f:
            result = merge_files(paths, f, tmp_dir=tmp_dir)
        verify_file(out)
        return result
    except BaseException:
        out.unlink(missing_ok=True)
        raise


# How much lower the merge worker's CPU priority is than the node's. Merges
# wait for the sync interval anyway; under a burst of commits on a busy machine
# the commit path (FUSE loop, the application) goes first, and the worker still
# gets a share (about a quarter of a contended core) to keep the backup moving.
WORKER_NICENESS = 5


def _lower_priority() -> None:
    os.nice(WORKER_NICENESS)


class MergeWorker:
    """`merge_to_file` in a one-process pool; blocking, so call it from a worker thread."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._guard = threading.Lock()

    def merge(self, paths: list[Path], out: Path, tmp_dir: Path) -> tuple[Header, Trailer]:
        with self._guard:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_lower_priority,
                )
            pool = self._pool
        try:
            return pool.submit(merge_to_file, paths, out, tmp_dir).result()
        except BrokenProcessPool:
            with self._guard:
                if self._pool is pool:
                    self._pool = None
            raise BackupError("the LTX merge worker process died; retrying") from None

    def close(self) -> None:
        with self._guard:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
