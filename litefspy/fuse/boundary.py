"""The one boundary between FUSE requests and the store: errno mapping,
request counting and request timing, in one decorator on every handler.

A handler may raise anything; pyfuse3 must only ever see FUSEError (any other
exception would end its main loop and the mount).
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import pyfuse3

from litefspy.errors import LitefspyError, ReadOnlyError
from litefspy.logs import kv
from litefspy.store.types import errno_for

log = logging.getLogger("litefspy.fuse.ops")

Observer = Callable[[str, float], None]
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


class Instrumented(Protocol):
    """What the decorator needs of the Operations instance."""

    request_counts: dict[str, int]
    observe: Observer | None


def to_fuse_error(exc: BaseException, op: str, name: str) -> pyfuse3.FUSEError:
    """The errno for a failed request, logged as its kind deserves."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    code = errno_for(exc)
    if isinstance(exc, ReadOnlyError):
        log.debug("%s refused: %s", op, exc)
    elif isinstance(exc, LitefspyError):
        log.error("%s failed %s: %s", op, kv(name=name), exc)
    elif isinstance(exc, OSError):
        log.debug("%s failed %s: %s", op, kv(name=name), exc)
    else:
        log.exception("unexpected error in %s %s", op, kv(name=name))
        code = errno.EIO
    return pyfuse3.FUSEError(code)


def fuse_request(
    op: str,
    name_of: Callable[[Any, tuple[Any, ...]], str] | None = None,
    *,
    counted: bool = True,
    timed: bool = True,
) -> Callable[[Handler], Handler]:
    """Make a method a FUSE request handler.

    `counted`: the request shows in `request_counts`; `timed`: its duration goes
    to `observe(op, seconds)` once timing is enabled (metrics); `name_of(self,
    args)` names the file in the log line of a failure (only computed then).
    Whatever the handler raises reaches pyfuse3 as a FUSEError.
    """

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(self: Instrumented, *args: Any) -> Any:
            if counted:
                counts = self.request_counts
                counts[op] = counts.get(op, 0) + 1
            observe = self.observe if timed else None
            start = time.perf_counter() if observe is not None else 0.0
            try:
                return await handler(self, *args)
            except pyfuse3.FUSEError:
                raise
            except Exception as exc:
                name = _describe(name_of, self, args)
                raise to_fuse_error(exc, op, name) from None
            finally:
                if observe is not None:
                    observe(op, time.perf_counter() - start)

        return cast(Handler, run)

    return decorate


def _describe(
    name_of: Callable[[Any, tuple[Any, ...]], str] | None, ops: Any, args: tuple[Any, ...]
) -> str:
    if name_of is None:
        return ""
    try:
        return name_of(ops, args)
    except Exception:
        return "?"
