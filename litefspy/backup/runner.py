"""Runs the uploader exactly while this node holds the primary lease.

A replica never uploads. On promotion the uploader starts (and first finds
where its history meets the backup's, see uploader.py); on demotion or
shutdown it is cancelled at once: a deposed primary stops writing to the
store, and whatever it had written past the new primary's fork point is a
branch by the new primary's epoch marker anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from litefspy.backup.target import Target
from litefspy.backup.uploader import BackupProgress, BackupTotals, Uploader
from litefspy.backup.worker import MergeWorker
from litefspy.config import BackupConfig, backup_target_spec
from litefspy.logs import kv
from litefspy.store.store import Store

log = logging.getLogger(__name__)


class BackupRunner:
    """Owns the backup target and the uploader; `report()` feeds status and metrics."""

    def __init__(
        self,
        config: BackupConfig,
        store: Store,
        *,
        is_primary: Callable[[], bool],
        epoch: Callable[[], int],
    ) -> None:
        self.config = config
        self.store = store
        self.is_primary = is_primary
        self.target = Target(backup_target_spec(config))
        self.totals = BackupTotals()
        self.worker = MergeWorker()
        self.uploader = Uploader(
            store,
            self.target,
            epoch=epoch,
            sync_interval=config.sync_interval,
            snapshot_interval=config.snapshot_interval,
            retention=config.retention,
            totals=self.totals,
            merge=self.worker.merge,
            notify=self._progress,
        )
        self._changed = trio.Event()
        self._listeners: list[Callable[[BackupProgress], None]] = []

    def listen(self, callback: Callable[[BackupProgress], None]) -> None:
        """Call `callback` (trio thread) for every object uploaded and every new error."""
        self._listeners.append(callback)

    def _progress(self, progress: BackupProgress) -> None:
        for callback in self._listeners:
            callback(progress)

    def role_changed(self, role: str) -> None:
        """Node callback (trio thread): wake the runner to start or stop uploading."""
        del role
        self._changed.set()

    async def run(self) -> None:
        """Until cancelled: upload while primary, idle otherwise."""
        try:
            await self._run()
        finally:
            self.worker.close()

    async def _run(self) -> None:
        while True:
            if not self.is_primary():
                await self._wait_change()
                continue
            log.info("backup uploads started %s", kv(target=self.target.spec.display))
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.uploader.run)
                    while self.is_primary():
                        await self._wait_change()
                    scope.cancel()
            log.info("backup uploads stopped: this node is no longer the primary")

    async def _wait_change(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    def report(self) -> dict[str, Any]:
        """What `status` shows under "backup"."""
        totals = self.totals
        return {
            "target": self.target.spec.display,
            "uploading": self.is_primary(),
            "bytes_uploaded": totals.bytes_uploaded,
            "objects_uploaded": totals.objects_uploaded,
            "errors": totals.errors,
            "last_compaction_ms": totals.last_compaction_ms,
            "databases": self.uploader.status() if self.is_primary() else {},
        }
