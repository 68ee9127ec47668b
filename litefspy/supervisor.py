"""Run the `exec:` commands of fuse.yml once the node is ready (LiteFS `exec`).

The commands run in order, each once the previous one exited 0: typically
migrations first (`if-candidate: true`, only on nodes that may become
primary), then the application, whose exit code becomes the node's. Each
command is split like a shell would (`shlex`, no shell in between, so signals
reach the program itself) and runs with the node's environment.

"Ready" means this node is the primary, or a replica that has caught up with
the primary (`skip-sync: true` starts at once). SIGINT and SIGTERM received by
the node are forwarded to the running command; after a signal no further
command is started. If the node stops for another reason, the running
command gets SIGTERM, then SIGKILL after `KILL_GRACE` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import trio

from litefspy.cluster.view import NodeView
from litefspy.config import ExecCommand
from litefspy.logs import kv

log = logging.getLogger(__name__)

# How often readiness is re-checked when the node offers no way to wait for it.
READY_POLL_INTERVAL = 0.1
# After SIGTERM, how long a command gets to exit before SIGKILL (node shutdown).
KILL_GRACE = 10.0
# Exit code when a command cannot be started (as a shell reports it).
NOT_FOUND_EXIT = 127


def exit_status(returncode: int) -> int:
    """A process's exit code as a shell reports it: 128+N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_foreground(argv: Sequence[str]) -> int:
    """`litefspy run -- CMD`: run `argv` to its end; its exit status (as `exit_status`).

    Unlike `exec:` and `mount -- CMD` (`run_exec`), the command stays in the
    caller's process group: an interactive command keeps the terminal and
    Ctrl-C reaches it directly, so nothing is forwarded; and a CLI process has
    no mount for the command to outlive, so it needs no DeathGuard. A command
    that cannot be started is a one-line error (exit 1), as for every command.
    """
    from litefspy.errors import LitefspyError

    try:
        proc = subprocess.run(list(argv), check=False)
    except OSError as exc:
        raise LitefspyError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    return exit_status(proc.returncode)


class RoleWatch:
    """Wakes waiters when the node's role changes (and re-checks every poll interval)."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self._token = trio.lowlevel.current_trio_token()
        self._changed = trio.Event()
        node.on_role_change(self._on_role_change)

    def _on_role_change(self, role: str) -> None:
        del role
        try:
            self._token.run_sync_soon(self._changed.set)
        except trio.RunFinishedError:
            pass

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` is true."""
        while not predicate():
            with trio.move_on_after(READY_POLL_INTERVAL):
                await self._changed.wait()
            if self._changed.is_set():
                self._changed = trio.Event()

    async def ready(self) -> None:
        """Return once the node is the primary or a replica caught up with the primary.

        A node may offer `async def wait_caught_up()` (returns once it is primary
        or its replication stream reported READY). Without it, a replica counts
        as ready once it knows its primary (is connected), a weaker test.
        """
        node = self.node
        wait_caught_up: Callable[[], Awaitable[None]] | None = getattr(node, "wait_caught_up", None)
        if wait_caught_up is not None:
            await wait_caught_up()
            return
        await self.until(lambda: node.is_primary() or node.primary_hostname() is not None)

    async def primary(self) -> None:
        """Return once the node is the primary."""
        await self.until(self.node.is_primary)


class _Supervisor:
    """Runs the commands; `on_signal` (from the node's signal receiver) forwards and stops."""

    def __init__(self) -> None:
        self.proc: trio.Process | None = None
        self.stopping = trio.Event()

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.proc is not None and self.proc.returncode is None:
            log.info("forwarding signal to command %s", kv(signal=name, pid=self.proc.pid))
            self.proc.send_signal(signum)
        else:
            log.info("shutting down %s", kv(signal=name))
        self.stopping.set()

    async def until_stopping(self, wait: Callable[[], Awaitable[None]]) -> bool:
        """Run `wait`; False if a signal came first."""
        done = False
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                nonlocal done
                await wait()
                done = True
                nursery.cancel_scope.cancel()

            async def stopper() -> None:
                await self.stopping.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(waiter)
            nursery.start_soon(stopper)
        return done

    async def run_command(self, argv: Sequence[str]) -> int:
        """Start `argv`, wait for it, return its exit status; kill it if cancelled."""
        guard = DeathGuard()
        try:
            proc = await trio.lowlevel.open_process(list(argv), process_group=guard.pgid)
        except OSError as exc:
            guard.disarm()
            log.error("cannot start command %s", kv(cmd=shlex.join(argv), error=exc.strerror))
            return NOT_FOUND_EXIT
        try:
            return await self._wait_command(proc, argv)
        finally:
            guard.disarm()

    async def _wait_command(self, proc: trio.Process, argv: Sequence[str]) -> int:
        self.proc = proc
        log.info("command started %s", kv(cmd=shlex.join(argv), pid=proc.pid))
        try:
            code = exit_status(await proc.wait())
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    await _terminate(proc)
            self.proc = None
        log.info("command exited %s", kv(cmd=shlex.join(argv), code=code))
        return code


# The guard: reads its stdin, whose only writer is litefspy; at end of file
# (litefspy is gone, however it died) it kills its whole process group, which
# the command joined, with everything the command started in it.
_GUARD = "read -r _; kill -KILL 0"


class DeathGuard:
    """Kills a command's process group as soon as litefspy dies (SIGKILL, OOM kill).

    A command that outlived its node would keep its port and files, and the
    restarted node's copy would fail ("Address already in use"): a restart loop
    under any supervisor. The kernel closes litefspy's end of a pipe however it
    dies (its exit never waits on its own mount: see store/keeper.py), so a tiny
    shell holding the other end notices at once. The guard leads the group the
    command joins; on a normal end only the guard is killed, the command is
    handled as before. Programs that move themselves to another process group
    or session are out of its reach.
    """

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()
        try:
            self._proc = subprocess.Popen(
                ["sh", "-c", _GUARD],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=0,
            )
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)
        self.pgid = self._proc.pid

    def disarm(self) -> None:
        """The command ended normally (or never started): stop the guard alone."""
        if self._write_end < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        os.close(self._write_end)
        self._write_end = -1


async def _terminate(proc: trio.Process) -> None:
    log.info("stopping command %s", kv(pid=proc.pid))
    proc.terminate()
    with trio.move_on_after(KILL_GRACE):
        await proc.wait()
        return
    log.warning("command ignored SIGTERM; killing it %s", kv(pid=proc.pid))
    proc.kill()
    await proc.wait()


def commands_to_run(
    commands: Sequence[ExecCommand], *, candidate: bool
) -> list[tuple[ExecCommand, list[str]]]:
    """The commands this node runs (if-candidate ones only on candidates), split into argv."""
    out = []
    for command in commands:
        if command.if_candidate and not candidate:
            log.info("skipping if-candidate command on a non-candidate %s", kv(cmd=command.cmd))
            continue
        argv = shlex.split(command.cmd)
        if argv:
            out.append((command, argv))
    return out


async def run_exec(
    node: NodeView,
    signals: AsyncIterator[int],
    *,
    command: Sequence[str] | None = None,
) -> int:
    """Run `exec:` (or `command`, from `mount -- CMD`) once ready; the last exit status.

    `signals` is the node's SIGINT/SIGTERM receiver; this consumes it until it
    returns. Returns 0 when a signal arrives before any command starts or when
    there is nothing to run; a non-zero status of a command that is not the
    last stops the sequence and is returned.
    """
    config = node.config
    if command:
        plan = [(ExecCommand(cmd=shlex.join(command)), list(command))]
    else:
        plan = commands_to_run(config.exec, candidate=config.lease.candidate)
    if not plan:
        return 0
    sup = _Supervisor()
    async with trio.open_nursery() as nursery:

        async def forward_signals() -> None:
            async for signum in signals:
                sup.on_signal(signum)

        nursery.start_soon(forward_signals)
        code = await _run_plan(node, sup, plan)
        nursery.cancel_scope.cancel()
    return code


async def _run_plan(
    node: NodeView, sup: _Supervisor, plan: list[tuple[ExecCommand, list[str]]]
) -> int:
    config = node.config
    watch = RoleWatch(node)
    if not config.skip_sync:
        if not node.is_primary():
            log.info("waiting to be primary or caught up with the primary before exec")
        if not await sup.until_stopping(watch.ready):
            return 0
    code = 0
    for index, (command, argv) in enumerate(plan):
        if sup.stopping.is_set():
            break
        if command.if_candidate and config.lease.promote and not config.skip_sync:
            # Migrations must write: with promote, wait for this node to take over.
            if not node.is_primary():
                log.info("waiting for promotion before an if-candidate command")
            if not await sup.until_stopping(watch.primary):
                break
        code = await sup.run_command(argv)
        if code != 0 and index < len(plan) - 1:
            log.error(
                "exec command failed; not starting the next %s", kv(cmd=command.cmd, code=code)
            )
            return code
    return code
