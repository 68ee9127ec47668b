"""CommitFeed: the one place a new LTX file (a commit, an apply, an import) is announced.

A subscriber is either a callback (called with the `CommitInfo`, inside the
FUSE handler or apply that committed: it must only record the fact) or a
`Watch`: a dirty set of database names plus a trio event, which costs a commit
one set insertion. Neither ever blocks a commit. Announcements are made on the
trio thread (commit notices captured in a worker thread are held until then:
see `Database.hold_notices`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from litefspy.store.types import CommitInfo, CommitListener


class Watch:
    """The databases committed to since the last `take`, and an event to wait on."""

    def __init__(self) -> None:
        self.changed: set[str] = set()
        self._event = trio.Event()

    def mark(self, name: str) -> None:
        """Record a commit to `name` and wake the waiter."""
        self.changed.add(name)
        self._event.set()

    def take(self) -> set[str]:
        """The databases committed to since the last call (and forget them)."""
        names, self.changed = self.changed, set()
        return names

    async def wait(self) -> None:
        """Wait for the next commit after the previous wait returned (or now, if pending)."""
        await self._event.wait()
        self._event = trio.Event()


class CommitFeed:
    """Fans commit notices out to every subscriber, in subscription order."""

    def __init__(self) -> None:
        self._listeners: list[CommitListener] = []

    def __len__(self) -> int:
        """How many subscribers there are."""
        return len(self._listeners)

    def publish(self, info: CommitInfo) -> None:
        """Announce a new LTX file to every subscriber."""
        for listener in list(self._listeners):
            listener(info)

    def subscribe(self, listener: CommitListener) -> Callable[[], None]:
        """Call `listener` after every new LTX file; returns an unsubscribe function.

        Listeners run inside the FUSE handler that committed, so they must only
        record the fact (e.g. set a trio.Event), never block.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @contextmanager
    def watch(self) -> Iterator[Watch]:
        """A `Watch` subscribed for the duration of the block."""
        watch = Watch()
        unsubscribe = self.subscribe(lambda info: watch.mark(info.name))
        try:
            yield watch
        finally:
            unsubscribe()
