"""In-process mounts: attach a store's lock keeper for as long as a nursery runs."""

from __future__ import annotations

from pathlib import Path

import trio

from litefspy.store.store import CacheInvalidator, Store


async def attach_store(
    store: Store,
    mnt: Path,
    invalidator: CacheInvalidator,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Nursery task: the store takes its locks through `mnt` until the nursery is cancelled."""
    store.attach_mount(mnt, invalidator)
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.detach_mount)
