"""Log lines: key=value text, JSON fields, rate-limited repeated warnings."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from litefspy import logs
from litefspy.logs import RateLimitFilter, kv


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(fmt: str, emit) -> list[str]:
    out = io.StringIO()
    logs.setup(fmt, debug=True, stream=out)
    emit(logging.getLogger("litefspy.test"))
    return out.getvalue().splitlines()


def test_text_format_keeps_key_value_text(restore_root: None) -> None:
    lines = _lines(
        "text",
        lambda log: log.error("%s failed %s: %s", "open", kv(name="a b.db"), "boom"),
    )
    assert lines[0].endswith('ERROR litefspy.test: open failed name="a b.db": boom')


def test_json_format_lifts_every_field(restore_root: None) -> None:
    def emit(log: logging.Logger) -> None:
        log.info("commit %s", kv(db="app.db", txid="0000000000000002", pages=3))
        log.error("%s failed %s: %s", "open", kv(name="a b.db"), "boom")
        log.info("listening", extra={"addr": "127.0.0.1:1"})
        log.info("compacted %s", kv(level=2, db=None))

    commit, failed, listening, compacted = (json.loads(line) for line in _lines("json", emit))
    assert commit["msg"] == "commit"
    assert (commit["db"], commit["txid"], commit["pages"]) == ("app.db", "0000000000000002", 3)
    assert commit["level"] == "info" and commit["logger"] == "litefspy.test"
    assert failed["msg"] == "open failed: boom" and failed["name"] == "a b.db"
    assert listening["addr"] == "127.0.0.1:1"
    # A field named like one of the line's own keys does not overwrite it.
    assert compacted["level"] == "info" and compacted["field_level"] == 2
    assert compacted["db"] is None


def test_repeated_warnings_are_counted_then_reported() -> None:
    now = [0.0]
    limiter = RateLimitFilter(window=10.0, clock=lambda: now[0])

    def record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("litefspy.proxy", level, "f.py", 1, msg, args, None)

    first = record("upstream failed %s", kv(upstream="http://a", error="refused"))
    assert limiter.filter(first)
    for i in range(5):
        now[0] += 1
        assert not limiter.filter(record("upstream failed %s", kv(upstream=f"http://{i}")))
    # Another reason, another database, or INFO: not the same kind, logged.
    assert limiter.filter(record("upstream failed %s: %s", kv(upstream="a"), "timeout"))
    assert limiter.filter(record("behind %s", kv(db="a.db")))
    assert limiter.filter(record("behind %s", kv(db="b.db")))
    assert limiter.filter(record("upstream failed %s", kv(), level=logging.INFO))
    now[0] = 10.5
    later = record("upstream failed %s", kv(upstream="http://a"))
    assert limiter.filter(later)
    assert later.suppressed == 5  # type: ignore[attr-defined]

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.TextFormatter())
    handler.handle(later)
    assert out.getvalue().rstrip().endswith("upstream=http://a (5 similar suppressed)")
    assert json.loads(logs.JSONFormatter().format(later))["suppressed"] == 5
