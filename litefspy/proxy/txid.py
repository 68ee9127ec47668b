"""Wake proxy reads that wait for a database to reach a TXID.

The node wires `TxidWaiters.notify` to the store's commit notifications (a
commit on the primary, an applied LTX file on a replica) and uses
`wait_for_txid` to implement `ProxyState.wait_for_txid`. `notify` only does an
attribute check when nobody waits, so it is safe on the commit hot path, and it
may be called from any thread.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

# Waiters also re-check this often, so a missed notification costs at most this.
RECHECK_INTERVAL = 0.25


class TxidWaiters:
    """Broadcast "some database advanced" to tasks waiting for a TXID."""

    def __init__(
        self, current_txid: Callable[[str], int], *, recheck_interval: float = RECHECK_INTERVAL
    ) -> None:
        self._current = current_txid
        self._recheck = recheck_interval
        self._event: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._waiting = 0

    def notify(self, *_: object) -> None:
        """A database advanced (accepts and ignores a CommitInfo, so it can be a listener)."""
        if self._waiting == 0 or self._token is None:
            return
        try:
            self._token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            pass

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_for_txid(self, db: str, txid: int) -> None:
        """Return once `current_txid(db) >= txid`; cancellable."""
        self._token = trio.lowlevel.current_trio_token()
        self._waiting += 1
        try:
            while self._current(db) < txid:
                if self._event is None:
                    self._event = trio.Event()
                event = self._event
                with trio.move_on_after(self._recheck):
                    await event.wait()
        finally:
            self._waiting -= 1
