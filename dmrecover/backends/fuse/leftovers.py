"""What dead sessions of the portable backend left: found by looking, never by trusting records.

Only things that are provably dmrecover's and provably dead are touched:

- FUSE mounts of type fuse.dmrecover whose server is gone (statfs gives ENOTCONN) and, when
  they sit in a session's state dir, whose session process no longer owns the state dir;
- loop devices whose backing file is on such a FUSE mount, or in the state dir of a session
  whose process is gone;
- mounts of those loop devices (unmounted lazily when a normal unmount fails: the filesystem on
  a dead FUSE server gets I/O errors);
- an XFS on those loop devices, mounted or caught mid-mount, which is first told to give up its
  failed writes (it would retry them for ever: sysfs.xfs_stop_retrying).

Everything else (other FUSE mounts, other loops, live sessions) is left alone. The removal
order is XFS retries, mounts, loops, FUSE mounts: each layer is released before the one under
it.
"""

from __future__ import annotations

import errno
import os
import threading

from dmrecover.backends.base import Leftover, SessionLookup
from dmrecover.errors import StackError
from dmrecover.system import loops
from dmrecover.system.mounts import fuse_unmount, mounts, umount_or_detach
from dmrecover.system.sysfs import xfs_on, xfs_stop_retrying

BACKEND = "fuse"
FUSE_TYPE = "fuse.dmrecover"

XFS = "xfs"
MOUNT = "mount"
LOOP = "loop"
FUSE = "fuse"


def fuse_dead(path: str, timeout: float = 2.0) -> bool:
    """True when the FUSE mount at path no longer has a server (ENOTCONN)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(path)  # statfs always reaches the server; stat may be cached
            result.append(False)
        except OSError as err:
            result.append(err.errno in (errno.ENOTCONN, errno.ECONNABORTED))

    # A thread: a hung server must not hang cleanup with it.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])  # a server too slow to answer is alive


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def find(sessions: SessionLookup) -> list[Leftover]:
    """Dead FUSE mounts, the loops on them or in dead sessions' state dirs, the mounts of
    those loops and any XFS on them: in removal order (XFS, mounts, loops, FUSE mounts)."""
    all_mounts = mounts()
    dead_fuse = []
    for m in all_mounts:
        if m.fstype != FUSE_TYPE:
            continue
        sdir = sessions.state_dir_of(m.target)
        if sdir is not None and sessions.is_live(sdir):
            continue  # a live session's own FUSE mount
        if fuse_dead(m.target):
            dead_fuse.append(m.target)
    dead_loops = []
    for dev, backing in loops.loops_backed_under("/"):  # every attached loop
        if any(_under(backing, d) for d in dead_fuse):
            dead_loops.append(dev)
            continue
        sdir = sessions.state_dir_of(backing)
        if sdir is not None and not sessions.is_live(sdir):
            dead_loops.append(dev)
    found = [Leftover(BACKEND, XFS, dev) for dev in dead_loops if xfs_on(dev)]
    found += [Leftover(BACKEND, MOUNT, m.target) for m in reversed(all_mounts)
              if m.source in dead_loops]
    found += [Leftover(BACKEND, LOOP, dev) for dev in dead_loops]
    # Deepest first: a FUSE mount inside another one goes before it.
    found += [Leftover(BACKEND, FUSE, path)
              for path in sorted(set(dead_fuse), key=lambda p: -len(p))]
    return found


def remove(item: Leftover) -> None:
    """Remove one leftover found by `find()` (lazily where a normal unmount fails)."""
    if item.kind == XFS:
        xfs_stop_retrying(item.name)
    elif item.kind == MOUNT:
        umount_or_detach(item.name)
    elif item.kind == LOOP:
        loops.detach(item.name)
    elif item.kind == FUSE:
        try:
            fuse_unmount(item.name)
        except StackError:
            fuse_unmount(item.name, lazy=True)
    else:
        raise ValueError(f"not a leftover of the fuse backend: {item}")
