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


FUSE_DEVICE = Path("/dev/fuse")
# Left by mkfs at a file system's root; hiding it under the mount loses nothing.
_HARMLESS_ENTRIES = frozenset({"lost+found"})


def check_mountpoint_empty(mountpoint: Path) -> None:
    """Refuse a fuse.dir that holds files: the mount would hide them from every app.

    An app that ran without litefspy (or before it started) may have created its
    database right there; mounting over it would silently swap that data for the
    (maybe empty) replicated one. A live or dead mount is left to `serve`.
    """
    try:
        if os.path.ismount(mountpoint):
            return
        entries = sorted(e for e in os.listdir(mountpoint) if e not in _HARMLESS_ENTRIES)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ENOTDIR):
            return  # a dead mount (cleaned up later) or a file (`serve` says so)
        raise LitefspyError(f"cannot read fuse.dir {mountpoint}: {exc.strerror}") from None
    if entries:
        more = len(entries) - 3
        shown = ", ".join(entries[:3]) + (f" and {more} more" if more > 0 else "")
        raise LitefspyError(
            f"fuse.dir {mountpoint} is not empty ({shown}): the mount would hide these files; "
            "move them elsewhere (import a database with `litefspy import`) or pick another "
            "fuse.dir"
        )


def check_can_mount(device: Path = FUSE_DEVICE, mountpoint: Path | None = None) -> None:
    """Refuse, in one line naming the cause and the fix, a machine that cannot mount FUSE,
    or a `mountpoint` whose files the mount would hide.

    Runs before anything is created (data.dir, fuse.dir), so a failed start
    leaves nothing behind.
    """
    if mountpoint is not None:
        check_mountpoint_empty(mountpoint)
    container_hint = "in a container, run it with --device /dev/fuse --cap-add SYS_ADMIN"
    if not device.exists():
        raise LitefspyError(
            f"cannot mount: {device} does not exist; load the fuse module (modprobe fuse) "
            f"or, {container_hint}"
        )
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise LitefspyError(
                f"cannot mount: permission denied opening {device}; run litefspy as root, or "
                f"{container_hint}"
            ) from None
        raise LitefspyError(f"cannot mount: cannot open {device}: {exc.strerror}") from None
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise LitefspyError(
            "cannot mount: fusermount3 is missing (non-root mounts need it); "
            "apt-get install fuse3, or run litefspy as root"
        )


def mount_options(*, allow_other: bool, debug: bool) -> set[str]:
    """The FUSE options (no writeback cache: every write must be seen).

    The kernel checks permissions itself (default_permissions) only when other
    users may reach the mount. Without allow_other only the user running
    litefspy can, and litefspy opens the real files as that same user, so the
    real files' permissions already apply; kernel checks would then cost a
    getattr of the mount's root after every create or unlink (twice per
    DELETE-mode commit: the journal), to answer nothing new.
    """
    options = set(pyfuse3.default_options)
    options.add("fsname=litefspy")
    options.add("subtype=litefspy")
    if allow_other:
        options.add("allow_other")
        options.add("default_permissions")
    else:
        options.discard("default_permissions")
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
    try:
        pyfuse3.init(ops, str(mountpoint), mount_options(allow_other=allow_other, debug=debug))
    except RuntimeError as exc:
        # libfuse printed its own reason on stderr just before.
        raise LitefspyError(
            f"cannot mount FUSE at {mountpoint}: {exc}; check that this user may mount "
            "(root, or fusermount3 and user_allow_other for allow-other)"
        ) from None
    # This process never makes a system call on its own mount (see
    # store/keeper.py): if it is killed, nothing in its exit waits for the
    # daemon it was, so /dev/fuse closes and the kernel aborts the connection.
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            task_status.started()
    finally:
        # unmount=True detaches lazily, so open files in apps do not block shutdown.
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", kv(dir=mountpoint))
