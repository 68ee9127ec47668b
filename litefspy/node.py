"""The composition root: builds the store, the FUSE layer (and later replication and
leases) from the config, and runs them in one trio nursery."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from litefspy.config import Config
from litefspy.fuse.mount import serve
from litefspy.fuse.ops import Operations
from litefspy.logs import kv
from litefspy.store.store import Store

log = logging.getLogger(__name__)


class Node:
    """One litefspy process: one store, one mount."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(
            Path(config.data.dir),
            compress=config.data.compress,
            strict_verify=config.strict_verify,
        )
        # Until replication lands, a static non-candidate node serves read-only.
        self.store.set_writable(config.lease.candidate)
        self.ops = Operations(self.store)
        self.ready = trio.Event()

    async def run(self, command: Sequence[str] | None = None) -> int:
        """Serve until SIGINT/SIGTERM (or until `command` exits); return the exit code."""
        self.store.open()
        mountpoint = Path(self.config.fuse.dir)
        exit_code = 0
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        lambda task_status: serve(
                            self.ops,
                            mountpoint,
                            allow_other=self.config.fuse.allow_other,
                            debug=self.config.fuse.debug,
                            task_status=task_status,
                        )
                    )
                    log.info(
                        "mounted %s",
                        kv(
                            dir=mountpoint,
                            data=self.config.data.dir,
                            node=f"{self.store.node_id:016X}",
                        ),
                    )
                    self.ready.set()
                    if command:
                        exit_code = await self._supervise(command, signals)
                    else:
                        async for signum in signals:
                            log.info("shutting down %s", kv(signal=signal.Signals(signum).name))
                            break
                    nursery.cancel_scope.cancel()
        finally:
            self.store.close()
        return exit_code

    async def _supervise(self, command: Sequence[str], signals: AsyncIterator[int]) -> int:
        """Run the application command, forwarding SIGINT/SIGTERM; return its exit code."""
        log.info("starting command %s", kv(cmd=" ".join(command)))
        proc = await trio.lowlevel.open_process(list(command))
        async with trio.open_nursery() as nursery:

            async def forward() -> None:
                async for signum in signals:
                    proc.send_signal(signum)

            nursery.start_soon(forward)
            code = await proc.wait()
            nursery.cancel_scope.cancel()
        log.info("command exited %s", kv(code=code))
        return code if code >= 0 else 128 - code
