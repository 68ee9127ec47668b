"""Mounting: option set, stale-mount cleanup, and the pyfuse3 main loop inside trio."""

from __future__ import annotations

import errno
import logging
import os
import shutil
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
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # One close through the mount, so the kernel learns at once that this
            # filesystem has no FLUSH (see Operations.flush) before litefspy keeps
            # descriptors open on its own mount.
            await trio.to_thread.run_sync(_close_once, mountpoint / ".lag")
            task_status.started()
    finally:
        # unmount=True detaches lazily, so open files in apps do not block shutdown.
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", kv(dir=mountpoint))
