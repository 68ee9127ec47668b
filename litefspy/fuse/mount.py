"""Mounting: option set, stale-mount cleanup, and the pyfuse3 main loop inside trio."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pyfuse3
import trio

from litefspy.errors import LitefspyError
from litefspy.logs import kv

log = logging.getLogger(__name__)


def _is_dead_mount(mountpoint: Path) -> bool:
    """A FUSE mount whose daemon is gone: listing it fails with ENOTCONN.

    stat() is not enough: the kernel may still answer it from cached attributes.
    """
    try:
        os.listdir(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def cleanup_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount a dead FUSE mount left by a killed process; refuse a live one."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        mountpoint.mkdir(parents=True, exist_ok=True)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
    if _is_dead_mount(mountpoint):
        log.warning("cleaning up stale mount %s", kv(dir=mountpoint))
        tool = shutil.which("fusermount3") or "fusermount3"
        subprocess.run([tool, "-u", "-z", str(mountpoint)], check=False, capture_output=True)
        os.stat(mountpoint)
        return
    if os.path.ismount(mountpoint):
        raise LitefspyError(
            f"{mountpoint} is already a mount point; unmount it (fusermount3 -u) or pick "
            "another fuse.dir"
        )
    if not mountpoint.is_dir():
        raise LitefspyError(f"fuse.dir {mountpoint} is not a directory")


def _close_once(path: Path) -> None:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        log.debug("priming close failed %s: %s", kv(path=path), exc)


# Aborts the FUSE connection while litefspy is exiting (see _start_watchdog).
# $1: litefspy's pid, $2: the connection's abort file. Field 9 of a task's
# /proc stat line is its flags; 0x4 is PF_EXITING. Any thread exiting but not
# yet a zombie means the process is going down (the one stuck flushing may be
# any thread, the main one already a zombie). A process that is gone has
# finished exiting: nothing to do (its connection number may already belong to
# a new mount). All builtins but sleep.
_WATCHDOG = """
pid=$1 abort=$2
while [ -d "/proc/$pid" ]; do
    for task in /proc/$pid/task/*; do
        read -r stat < "$task/stat" 2>/dev/null || continue
        set -- ${stat##*) }
        [ "$1" = Z ] && continue
        if [ $(( $7 & 4 )) -ne 0 ]; then
            echo 1 > "$abort"
            exit 0
        fi
    done
    sleep 0.5
done
"""


def _connection_id(mountpoint: Path) -> int | None:
    """The FUSE connection number of the mount at `mountpoint` (from mountinfo, no FUSE I/O)."""
    # Not mountpoint.resolve(): that would stat the mount root, which waits for
    # this very daemon. mountinfo escapes blanks and backslashes as octal.
    target = str(mountpoint.parent.resolve() / mountpoint.name)
    for char in "\\ \t\n":
        target = target.replace(char, f"\\{ord(char):03o}")
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        fields = line.split()
        if len(fields) > 4 and fields[4] == target:
            major, _, minor = fields[2].partition(":")
            return int(minor) if major == "0" and minor.isdigit() else None
    return None


def _start_watchdog(mountpoint: Path) -> subprocess.Popen[bytes] | None:
    """A tiny process that aborts this mount's FUSE connection if litefspy is killed.

    When litefspy dies (SIGKILL, OOM), the kernel closes its descriptors one by
    one; closing a descriptor litefspy holds on its own mount flushes the pages
    applications dirtied through mmap (SQLite's -shm), which needs the dead
    daemon: the process would hang in exit forever, leaving a dead mount. The
    release of /dev/fuse that would abort the connection only runs after all
    descriptors are closed, and so does any signal tied to litefspy's exit
    (parent-death signal, pipe EOF): the watchdog instead polls the process's
    flags and aborts the connection as soon as litefspy starts exiting. A
    clean shutdown kills the watchdog first (see serve).
    """
    conn = _connection_id(mountpoint)
    if conn is None:
        log.debug("no FUSE watchdog: connection of %s not found", mountpoint)
        return None
    abort = Path(f"/sys/fs/fuse/connections/{conn}/abort")
    if not abort.exists():
        log.debug("no FUSE watchdog: %s is missing (fusectl not mounted)", abort)
        return None
    return subprocess.Popen(
        ["sh", "-c", _WATCHDOG, "sh", str(os.getpid()), str(abort)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def mount_options(*, allow_other: bool, debug: bool) -> set[str]:
    """The FUSE options: default_permissions; no writeback cache (every write must be seen)."""
    options = set(pyfuse3.default_options)
    options.add("fsname=litefspy")
    options.add("subtype=litefspy")
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    return options


async def serve(
    ops: pyfuse3.Operations,
    mountpoint: Path,
    *,
    allow_other: bool = False,
    debug: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount `ops` at `mountpoint` and serve until cancelled; always unmounts."""
    cleanup_stale_mount(mountpoint)
    pyfuse3.init(ops, str(mountpoint), mount_options(allow_other=allow_other, debug=debug))
    watchdog = _start_watchdog(mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # One close through the mount, so the kernel learns at once that this
            # filesystem has no FLUSH (see Operations.flush) before litefspy keeps
            # descriptors open on its own mount.
            await trio.to_thread.run_sync(_close_once, mountpoint / ".lag")
            task_status.started()
    finally:
        if watchdog is not None:
            # No abort on a clean shutdown: kill the watchdog and its sleep (its
            # own process group).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(watchdog.pid, signal.SIGKILL)
            watchdog.wait()
        # unmount=True detaches lazily, so open files in apps do not block shutdown.
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", kv(dir=mountpoint))
