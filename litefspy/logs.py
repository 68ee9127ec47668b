"""Logging setup: one logger per module, key=value context, text or JSON lines.

Call sites write `log.info("commit %s", kv(db=name, txid=...))`. `kv()` returns
a `Fields`: a `str` (the `key=value` text, so the text format prints exactly
that) that also carries the fields themselves. The JSON formatter lifts the
fields of every `Fields` argument into top-level JSON keys and keeps only the
human text in `msg`. Fields passed the stdlib way (`extra={...}`) are lifted
too. This needs no change at the ~130 call sites, and the text format stays
byte for byte what it was.

Repeated warnings are rate-limited (`RateLimitFilter`): the first
one in a window is logged, the others are counted, and the next one logged
after the window says how many were suppressed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

# JSON keys the formatter writes itself; a field with one of these names is
# written as `field_<name>` instead of overwriting it.
_RESERVED = frozenset({"time", "level", "logger", "msg", "exc", "suppressed"})
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "suppressed",
}
# How long repeated warnings of one kind are counted instead of logged.
RATE_LIMIT_WINDOW = 10.0


class Fields(str):
    """`key=value` text that also carries its fields (what `kv()` returns)."""

    fields: dict[str, Any]

    def __new__(cls, fields: Mapping[str, Any]) -> Fields:
        self = super().__new__(cls, " ".join(f"{k}={_quote(v)}" for k, v in fields.items()))
        self.fields = dict(fields)
        return self


def kv(**fields: Any) -> Fields:
    """Format context fields as `key=value` pairs for a log message."""
    return Fields(fields)


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text) or '"' in text:
        return json.dumps(text)
    return text


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    out[f"field_{key}" if key in _RESERVED else key] = _json_value(value)


# Where a Fields argument stood in the message, while it is being taken out.
_HOLE = "\x00"
_HOLE_BEFORE_PUNCT = re.compile(r" ?\x00 ?(?=[:;,.)]|$)")
_HOLE_BETWEEN = re.compile(r" ?\x00 ?")


def split_message(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The record's human text without its `key=value` parts, and those fields."""
    fields: dict[str, Any] = {}
    args = record.args
    if isinstance(args, tuple) and any(isinstance(a, Fields) for a in args):
        plain: list[Any] = []
        for arg in args:
            if isinstance(arg, Fields):
                fields.update(arg.fields)
                plain.append(_HOLE)
            else:
                plain.append(arg)
        try:
            text = str(record.msg) % tuple(plain)
        except (TypeError, ValueError):
            return record.getMessage(), {}
        text = _HOLE_BETWEEN.sub(" ", _HOLE_BEFORE_PUNCT.sub("", text)).strip()
        return text, fields
    return record.getMessage(), fields


class JSONFormatter(logging.Formatter):
    """One JSON object per line; every key=value of the line is a top-level key."""

    def format(self, record: logging.LogRecord) -> str:
        msg, fields = split_message(record)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        for key, value in fields.items():
            _put(out, key, value)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                _put(out, key, value)
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            out["suppressed"] = suppressed
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL logger: message`, plus how many similar lines were suppressed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            text += f" ({suppressed} similar suppressed)"
        return text


class RateLimitFilter(logging.Filter):
    """Let through one WARNING-or-worse line per kind and `window` seconds.

    Lines are of one kind when they have the same logger, level, human text
    (the message without its `key=value` fields) and `db` field: the same
    warning about different requests or peers counts as repeated, while one
    with another reason (an exception's text) or about another database does not. The
    first line logged after a window in which others were suppressed carries
    `suppressed=N` (text: "(N similar suppressed)"). INFO and DEBUG pass.
    """

    def __init__(
        self,
        window: float = RATE_LIMIT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        # kind -> (when its last line was logged, how many suppressed since)
        self._sites: dict[tuple[str, int, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text, fields = split_message(record)
        site = (record.name, record.levelno, text, str(fields.get("db", "")))
        now = self.clock()
        with self._lock:
            last = self._sites.get(site)
            if last is not None and now - last[0] < self.window:
                self._sites[site] = (last[0], last[1] + 1)
                return False
            self._sites[site] = (now, 0)
            if len(self._sites) > 10_000:
                self._forget(now)
        if last is not None and last[1]:
            record.suppressed = last[1]
        return True

    def _forget(self, now: float) -> None:
        for site, (when, count) in list(self._sites.items()):
            if now - when >= self.window and not count:
                del self._sites[site]


def setup(fmt: str = "text", debug: bool = False, stream: Any = None) -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
