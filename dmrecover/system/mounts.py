"""Mounts: the one /proc/self/mountinfo parser, mount and unmount.

Every question about what is mounted where (`mounts`, `mount_at`, `is_mountpoint`, `mounts_of`)
reads mountinfo through `mounts()`. `umount()` refuses while any process still holds the mount
and names those processes: the cutover must never pull a filesystem from under a live
application.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from dataclasses import dataclass

from dmrecover.errors import StackError
from dmrecover.system import command, libc
from dmrecover.system.loops import loop_of
from dmrecover.system.processes import describe, processes_holding
from dmrecover.system.sysfs import devnum, with_partitions

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (proc(5)): ids, device number, root, target, options, fs."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    target: str
    options: str
    fstype: str
    source: str
    super_options: str

    @property
    def major_minor(self) -> str:
        return f"{self.major}:{self.minor}"


_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal escapes."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every well-formed line of a mountinfo text, in order (malformed lines skipped)."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        a = left.split()
        b = right.split()
        if not sep or len(a) < 6 or len(b) < 2:
            continue
        try:
            major, minor = (int(x) for x in a[2].split(":"))
            out.append(MountEntry(
                mount_id=int(a[0]), parent_id=int(a[1]), major=major, minor=minor,
                root=_unescape(a[3]), target=_unescape(a[4]), options=a[5],
                fstype=b[0], source=_unescape(b[1]),
                super_options=b[2] if len(b) > 2 else ""))
        except ValueError:
            continue
    return out


def mounts() -> list[MountEntry]:
    """Every mount in this namespace, in mount order."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mount_at(target: str | os.PathLike[str]) -> MountEntry | None:
    """The topmost mount at target, or None."""
    target = os.path.abspath(target)
    found = None
    for m in mounts():
        if m.target == target:
            found = m
    return found


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True when something is mounted at path (works even if the mount is dead/ENOTCONN)."""
    return mount_at(path) is not None


def mounts_of(path: str | os.PathLike[str]) -> list[str]:
    """Mount points that use the block device (or its partitions), or a loop over the file."""
    num = devnum(path)
    if num is None:
        return sorted({mp for loop in loop_of(path) for mp in mounts_of(loop)})
    nums = with_partitions(*num)
    return sorted({m.target for m in mounts() if (m.major, m.minor) in nums})


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


def mount_fuse(fd: int, target: str, *, fsname: str, subtype: str,
               read_only: bool = False) -> None:
    """Mount the FUSE connection open on `fd` (/dev/fuse) at target: the mount(2) call itself,
    as root needs no fusermount3 (the kernel takes the connection as `fd=N`). Only root and
    the files' modes decide access (default_permissions, no allow_other)."""
    fn = libc.function("mount", ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                       ctypes.c_ulong, ctypes.c_char_p)
    if fn is None:
        raise StackError("this C library has no mount() call")
    flags = _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if read_only else 0)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    if fn(fsname.encode(), os.fsencode(target), f"fuse.{subtype}".encode(), flags,
          data.encode()) != 0:
        err = libc.errno()
        raise StackError(f"cannot mount FUSE on {target}: {os.strerror(err)}",
                         hint="is /dev/fuse there and the directory not in use?")


def fuse_unmount(path: str, *, lazy: bool = False) -> None:
    """fusermount3 -u [-z] path (a no-op when nothing is mounted there)."""
    if not is_mountpoint(path):
        return
    argv = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    command.run(argv, error=StackError, what=f"unmounting the FUSE mount {path}")


def umount_or_detach(target: str) -> bool:
    """Unmount what a dead session left: normally (a few retries, no holder check), else
    lazily (a filesystem over a dead FUSE server errors on a normal unmount). True when it
    had to be lazy."""
    try:
        umount(target, check_holders=False, retries=3)
        return False
    except StackError as err:
        log.warning("unmount of %s failed (%s); unmounting lazily", target, err)
        umount(target, lazy=True)
        return True


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
