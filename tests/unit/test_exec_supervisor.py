"""`supervisor.run_exec`: the `exec:` commands as real child processes."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from litefspy.supervisor import run_exec
from tests.support.services_harness import FakeNode, make_config

PY = shlex.quote(sys.executable)

# Writes "ready" to argv[1], then waits for SIGTERM/SIGINT, records it and exits 7.
TRAPPER = r"""
import signal, sys, time
path = sys.argv[1]
def on_signal(signum, frame):
    with open(path, "a") as f:
        f.write(f" got {signal.Signals(signum).name}")
    sys.exit(7)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
with open(path, "w") as f:
    f.write("ready")
time.sleep(60)
sys.exit(1)
"""


def _touch(path: Path, code: int = 0) -> str:
    """A command that creates `path` (appending its name) and exits `code`."""
    script = f"open({str(path)!r}, 'a').write('x'); raise SystemExit({code})"
    return f"{PY} -c {shlex.quote(script)}"


def _node(
    tmp_path: Path, exec_: Any, *, candidate: bool = True, promote: bool = False, **extra: Any
) -> FakeNode:
    lease = {"candidate": candidate, "promote": promote}
    return FakeNode(make_config(tmp_path, lease=lease, exec=exec_, **extra))


async def _run(node: FakeNode, **kwargs: Any) -> tuple[int, trio.MemorySendChannel[int]]:
    send, recv = trio.open_memory_channel[int](10)
    code = await run_exec(node, recv, **kwargs)
    return code, send


async def test_last_exit_code_is_passed_through(tmp_path: Path) -> None:
    first, last = tmp_path / "first", tmp_path / "last"
    node = _node(tmp_path, [_touch(first), {"cmd": _touch(last, 3)}])
    with trio.fail_after(20):
        code, _ = await _run(node)
    assert code == 3
    assert first.exists() and last.exists()


async def test_a_failing_earlier_command_stops_the_sequence(tmp_path: Path) -> None:
    migrate, app = tmp_path / "migrate", tmp_path / "app"
    node = _node(tmp_path, [_touch(migrate, 2), _touch(app)])
    with trio.fail_after(20):
        code, _ = await _run(node)
    assert code == 2
    assert migrate.exists() and not app.exists()


async def test_missing_program_is_127(tmp_path: Path) -> None:
    node = _node(tmp_path, "/nonexistent/program --flag")
    code, _ = await _run(node)
    assert code == 127


async def test_signals_are_forwarded_to_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    node = _node(tmp_path, f"{PY} -c {shlex.quote(TRAPPER)} {shlex.quote(str(marker))}")
    send, recv = trio.open_memory_channel[int](10)
    result: list[int] = []

    async def supervise() -> None:
        result.append(await run_exec(node, recv))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervise)
            while not marker.exists() or marker.read_text() != "ready":
                await trio.sleep(0.02)
            await send.send(signal.SIGTERM)
    assert result == [7]
    assert marker.read_text() == "ready got SIGTERM"


async def test_command_killed_by_a_signal_reports_128_plus_n(tmp_path: Path) -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    node = _node(tmp_path, f"{PY} -c {shlex.quote(script)}")
    code, _ = await _run(node)
    assert code == 128 + signal.SIGKILL


async def test_if_candidate_commands_skip_non_candidates(tmp_path: Path) -> None:
    migrate, app = tmp_path / "migrate", tmp_path / "app"
    exec_ = [{"cmd": _touch(migrate), "if-candidate": True}, {"cmd": _touch(app, 5)}]
    replica = _node(tmp_path / "r", exec_, candidate=False)
    replica.set_role(False, "node-p")
    code, _ = await _run(replica)
    assert code == 5 and app.exists() and not migrate.exists()

    app.unlink()
    candidate = _node(tmp_path / "c", exec_, candidate=True)
    code, _ = await _run(candidate)
    assert code == 5 and app.exists() and migrate.exists()


async def test_waits_until_ready_unless_skip_sync(tmp_path: Path) -> None:
    app = tmp_path / "app"
    node = _node(tmp_path, _touch(app), candidate=False)
    node.set_role(False, None)  # a replica not connected to any primary yet
    result: list[int] = []
    _send, recv = trio.open_memory_channel[int](10)

    async def supervise() -> None:
        result.append(await run_exec(node, recv))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervise)
            await trio.sleep(0.5)
            assert not app.exists()
            node.set_role(False, "node-p")  # connected (and, for this fake, caught up)
    assert result == [0] and app.exists()

    # A node that says when it is caught up is asked, and waited for.
    caught_up = trio.Event()
    app.unlink()
    node.wait_caught_up = caught_up.wait  # type: ignore[attr-defined]
    result.clear()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervise)
            await trio.sleep(0.3)
            assert not app.exists()
            caught_up.set()
    assert result == [0] and app.exists()

    app.unlink()
    skipper = _node(tmp_path / "s", _touch(app), candidate=False, **{"skip-sync": True})
    skipper.set_role(False, None)
    with trio.fail_after(20):
        code, _ = await _run(skipper)
    assert code == 0 and app.exists()


async def test_signal_before_ready_starts_nothing(tmp_path: Path) -> None:
    app = tmp_path / "app"
    node = _node(tmp_path, _touch(app), candidate=False)
    node.set_role(False, None)
    send, recv = trio.open_memory_channel[int](10)
    await send.send(signal.SIGINT)
    with trio.fail_after(20):
        assert await run_exec(node, recv) == 0
    assert not app.exists()


async def test_promote_waits_for_primary_before_if_candidate(tmp_path: Path) -> None:
    migrate = tmp_path / "migrate"
    exec_ = [{"cmd": _touch(migrate), "if-candidate": True}, _touch(tmp_path / "app")]
    node = _node(tmp_path, exec_, candidate=True, promote=True)
    node.set_role(False, "node-p")  # caught up as a replica, handoff pending
    result: list[int] = []
    _, recv = trio.open_memory_channel[int](10)

    async def supervise() -> None:
        result.append(await run_exec(node, recv))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervise)
            await trio.sleep(0.5)
            assert not migrate.exists()
            node.set_role(True, "node-a")
    assert result == [0] and migrate.exists()


async def test_cancelled_supervisor_terminates_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    node = _node(tmp_path, f"{PY} -c {shlex.quote(TRAPPER)} {shlex.quote(str(marker))}")
    _, recv = trio.open_memory_channel[int](10)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_exec, node, recv)
            while not marker.exists() or marker.read_text() != "ready":
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert marker.read_text() == "ready got SIGTERM"


async def test_mount_command_overrides_exec(tmp_path: Path) -> None:
    app = tmp_path / "app"
    node = _node(tmp_path, _touch(tmp_path / "not-run"))
    script = f"open({str(app)!r}, 'w'); raise SystemExit(4)"
    code, _ = await _run(node, command=[sys.executable, "-c", script])
    assert code == 4 and app.exists() and not (tmp_path / "not-run").exists()
