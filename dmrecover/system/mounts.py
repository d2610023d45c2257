"""Mount and unmount, with the checks the data agent needs.

`umount()` refuses while any process still holds the mount and names those processes: the
cutover must never pull a filesystem from under a live application.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from dmrecover.errors import StackError
from dmrecover.session.app import describe, processes_holding
from dmrecover.system import command

log = logging.getLogger(__name__)


@dataclass
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    major_minor: str
    root: str
    target: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    return (s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mounts() -> list[MountEntry]:
    """Every mount in this namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a = left.split()
            b = right.split()
            if len(a) < 5 or len(b) < 2:
                continue
            out.append(MountEntry(int(a[0]), a[2], _unescape(a[3]), _unescape(a[4]),
                                  b[0], _unescape(b[1]), b[2] if len(b) > 2 else ""))
    return out


def mount_at(target: str) -> MountEntry | None:
    """The topmost mount at target, or None."""
    target = os.path.abspath(target)
    found = None
    for m in mounts():
        if m.target == target:
            found = m
    return found


def is_mountpoint(path: str) -> bool:
    """True when something is mounted at path (works even if the mount is dead/ENOTCONN)."""
    return mount_at(path) is not None


def mount(source: str, target: str, fstype: str | None, options: list[str] | None = None) -> None:
    """Mount source at target. XFS gets nouuid: a restored copy shares its origin's UUID."""
    opts = list(options or [])
    if fstype == "xfs" and "nouuid" not in opts:
        opts.append("nouuid")
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += [source, target]
    command.run(argv, error=StackError, what=f"mounting {source} at {target}", timeout=300)


def umount(target: str, *, lazy: bool = False, check_holders: bool = True,
           retries: int = 20) -> None:
    """Unmount target; refuse (StackError naming them) while processes hold it.

    lazy: detach now even if busy or dead (used to tear down what a crashed session left).
    A transiently busy mount (e.g. a process just exiting) is retried for ~1 s.
    """
    target = os.path.abspath(target)
    if lazy:
        command.run(["umount", "-l", target], error=StackError, what=f"unmounting {target}",
                    timeout=60)
        return
    if check_holders:
        holders = processes_holding(target)
        if holders:
            raise StackError(f"{target} is busy: held by {describe(holders)}",
                             hint="stop those processes first")
    for attempt in range(retries):
        r = command.run(["umount", target], check=False, timeout=300)
        if r.returncode == 0:
            return
        if "busy" not in r.stderr or attempt == retries - 1:
            holders = processes_holding(target)
            extra = f": held by {describe(holders)}" if holders else ""
            raise StackError(f"unmounting {target} failed: {r.stderr.strip() or r.returncode}"
                             f"{extra}", argv=r.args, returncode=r.returncode, stderr=r.stderr)
        time.sleep(0.05)
