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
from pathlib import Path
from typing import Any

import trio

from litefspy.backup.target import Target
from litefspy.backup.uploader import BackupProgress, BackupTotals, Uploader
from litefspy.backup.worker import MergeWorker
from litefspy.config import BackupConfig, backup_target_spec
from litefspy.errors import LitefspyError
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

    async def restore_if_empty(self, dbs: Path) -> None:
        """backup.restore-if-empty: a node with no databases restores every one first.

        The "every machine was lost" path: before this node serves or asks for
        the lease. An unreachable store stops the start (one line): serving an
        empty data.dir as if it were the data would be worse.
        """
        from litefspy.backup.restore import (
            describe,
            list_databases,
            record_deletion_in_data_dir,
            restore_into_data_dir,
        )

        if await trio.to_thread.run_sync(_has_databases, dbs):
            return
        target = self.target
        try:
            names = await trio.to_thread.run_sync(list_databases, target)
            for name in names:
                found = await trio.to_thread.run_sync(describe, target, name)
                if found.deleted is not None:
                    # Deleted on the primary: bringing it back would undo the deletion.
                    # Its history (the deletion) is kept, so that TXIDs go on from it.
                    await trio.to_thread.run_sync(
                        record_deletion_in_data_dir, target, dbs, name, found.deleted
                    )
                    log.info(
                        "backup.restore-if-empty: database was deleted; not restored %s",
                        kv(db=name, txid=f"{found.deleted.max_txid:016x}"),
                    )
                    continue
                result = await trio.to_thread.run_sync(restore_into_data_dir, target, dbs, name)
                log.info(
                    "restored database from the backup %s",
                    kv(db=name, txid=f"{result.txid:016x}", objects=result.files),
                )
        except LitefspyError as exc:
            raise LitefspyError(
                f"backup.restore-if-empty: {exc}; not starting with an empty data.dir"
            ) from None
        if not names:
            log.info("backup.restore-if-empty: the backup holds no databases yet")


def _has_databases(dbs: Path) -> bool:
    return any(p.is_dir() for p in dbs.iterdir())
