"""`dmrecover cleanup`: find and remove what dead dmrecover sessions left behind.

Only things that are provably dmrecover's and provably dead are touched:

- FUSE mounts of type fuse.dmrecover whose server is gone (stat gives ENOTCONN) and, when they
  sit in a session's state dir, whose session process no longer holds the state dir's lock;
- loop devices whose backing file is on such a FUSE mount, or in the state dir of a session
  whose process is gone (a file under a directory holding session.json);
- mounts of those loop devices (unmounted lazily when a normal unmount fails: the filesystem on
  a dead FUSE server gets I/O errors).

Everything else (other FUSE mounts, other loops, live sessions) is left alone. Device-mapper
leftovers (devices with the dmrecover UUID prefix) are found by `_dm_leftovers()`, the hook the
dm backend fills in.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field

from dmrecover.backends.fuse.stack import detach_loop, fuse_unmount
from dmrecover.errors import StackError
from dmrecover.session.session import SESSION_FILE, lock_held
from dmrecover.system.mounts import mounts, umount

log = logging.getLogger(__name__)

FUSE_TYPE = "fuse.dmrecover"


@dataclass
class Leftovers:
    """What cleanup found, in removal order: mounts, then loops, then FUSE mounts, then dm."""

    mounts: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    fuse: list[str] = field(default_factory=list)
    dm: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.mounts or self.loops or self.fuse or self.dm)


def _session_dir_of(path: str) -> str | None:
    """The nearest ancestor of path holding session.json (a dmrecover state dir), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isfile(os.path.join(d, SESSION_FILE)):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _fuse_dead(path: str, timeout: float = 2.0) -> bool:
    """True when the FUSE mount at path no longer has a server (ENOTCONN)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(path)  # statfs always reaches the server; stat may be cached
            result.append(False)
        except OSError as err:
            result.append(err.errno in (errno.ENOTCONN, errno.ECONNABORTED))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])  # a server too slow to answer is alive


def _loops() -> list[tuple[str, str]]:
    out = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                out.append((f"/dev/{name}", f.read().strip().removesuffix(" (deleted)")))
        except OSError:
            continue
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _dm_leftovers() -> list[str]:
    """Device-mapper devices of dead sessions (dmrecover UUID prefix): the dm backend's part.

    Returns names in removal order; `_remove_dm` removes one. Empty where device-mapper is
    not usable (no dmsetup, no driver, not root).
    """
    from dmrecover.backends.dm import dmsetup as dm
    from dmrecover.backends.dm.stack import leftover_devices

    if not dm.available("snapshot"):
        return []
    return leftover_devices()


def _remove_dm(name: str) -> None:
    from dmrecover.backends.dm.stack import remove_leftover

    remove_leftover(name)


def find_leftovers() -> Leftovers:
    """Look (never trust records) for dmrecover's dead mounts, loops and FUSE mounts."""
    found = Leftovers()
    all_mounts = mounts()
    dead_fuse = []
    for m in all_mounts:
        if m.fstype != FUSE_TYPE:
            continue
        sdir = _session_dir_of(m.target)
        if sdir is not None and lock_held(sdir):
            continue  # a live session's own FUSE mount
        if _fuse_dead(m.target):
            dead_fuse.append(m.target)
    dead_dirs = set(dead_fuse)
    loops = []
    for dev, backing in _loops():
        if any(_under(backing, d) for d in dead_dirs):
            loops.append(dev)
            continue
        sdir = _session_dir_of(backing)
        if sdir is not None and not lock_held(sdir):
            loops.append(dev)
    for m in reversed(all_mounts):
        if m.source in loops:
            found.mounts.append(m.target)
    found.loops = loops
    found.fuse = sorted(set(dead_fuse), key=lambda p: -len(p))
    found.dm = _dm_leftovers()
    if found.dm:
        from dmrecover.backends.dm.stack import mounts_of_devices

        # Filesystems on those devices go first (remove_leftovers unmounts before removing).
        found.mounts = mounts_of_devices(found.dm) + [m for m in found.mounts
                                                      if m not in mounts_of_devices(found.dm)]
    return found


def remove_leftovers(found: Leftovers) -> list[str]:
    """Remove what find_leftovers() found; returns the problems (empty when all went)."""
    problems = []
    for mp in found.mounts:
        try:
            umount(mp, check_holders=False, retries=3)
        except StackError:
            try:
                umount(mp, lazy=True)
            except StackError as err:
                problems.append(str(err))
    for dm in found.dm:
        try:
            _remove_dm(dm)
        except StackError as err:
            problems.append(str(err))
    for dev in found.loops:
        try:
            detach_loop(dev)
        except StackError as err:
            problems.append(str(err))
    for path in found.fuse:
        try:
            fuse_unmount(path)
        except StackError:
            try:
                fuse_unmount(path, lazy=True)
            except StackError as err:
                problems.append(str(err))
    return problems


def cleanup_command(args) -> int:
    """`dmrecover cleanup [--dry-run]`."""
    found = find_leftovers()
    if found.empty():
        print("nothing to clean up")
        return 0
    verb = "would remove" if args.dry_run else "removing"
    for mp in found.mounts:
        print(f"{verb} mount {mp}")
    for dm in found.dm:
        print(f"{verb} device-mapper device {dm}")
    for dev in found.loops:
        print(f"{verb} loop device {dev}")
    for path in found.fuse:
        print(f"{verb} FUSE mount {path}")
    if args.dry_run:
        return 0
    problems = remove_leftovers(found)
    for p in problems:
        print(f"dmrecover: cleanup: {p}")
    return 1 if problems else 0
