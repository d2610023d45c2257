"""Loop devices: the one lookup of which loop backs a file, attach and detach.

A loop's backing file is matched by inode and device number (`loop_of`), never by path: paths
may be relative, renamed or deleted. `backing_file` and `loops_backed_under` read sysfs (the
path the kernel recorded), which is what cleanup needs to find a dead session's loops.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from dmrecover.errors import StackError
from dmrecover.system import command
from dmrecover.system.sysfs import stat_path

SYS_BLOCK = Path("/sys/block")


def _loop_names() -> list[str]:
    """Names (loopN) of the loop devices that have a backing file now."""
    try:
        names = sorted(os.listdir(SYS_BLOCK))
    except OSError:
        return []
    return [n for n in names if n.startswith("loop") and (SYS_BLOCK / n / "loop").is_dir()]


def _name_of(dev: str | tuple[int, int]) -> str | None:
    if isinstance(dev, tuple):
        try:
            return os.path.basename(os.readlink(f"/sys/dev/block/{dev[0]}:{dev[1]}"))
        except OSError:
            return None
    return os.path.basename(dev)


def backing_file(dev: str | tuple[int, int]) -> str | None:
    """The backing file of a loop device (/dev/loopN, loopN or (major, minor)), None when it is
    not attached or not a loop; a deleted file's path without the kernel's " (deleted)"."""
    name = _name_of(dev)
    if not name:
        return None
    try:
        text = (SYS_BLOCK / name / "loop" / "backing_file").read_text()
    except OSError:
        return None
    return text.strip().removesuffix(" (deleted)")


def loops_backed_under(directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(loop device, backing file) for every loop whose backing file is under directory."""
    root = os.path.abspath(directory)
    found = []
    for name in _loop_names():
        path = backing_file(name)
        if path is not None and (path == root or path.startswith(root.rstrip("/") + "/")):
            found.append((f"/dev/{name}", path))
    return found


def loop_of(file: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is `file` (matched by inode and device), maybe none."""
    st = stat_path(file)
    if not stat.S_ISREG(st.st_mode) or not _loop_names():
        return []  # not a file, or no loop attached at all: spare the losetup call
    res = command.run(["losetup", "--list", "--json", "-O", "NAME,BACK-INO,BACK-MAJ:MIN"],
                      check=False, error=StackError)
    found = []
    if res.returncode == 0 and res.stdout.strip():
        for dev in json.loads(res.stdout).get("loopdevices", []):
            try:
                ino = int(dev.get("back-ino") or -1)
                ma, mi = str(dev.get("back-maj:min") or "-1:-1").strip().split(":")
            except ValueError:
                continue
            if ino == st.st_ino and os.makedev(int(ma), int(mi)) == st.st_dev:
                found.append(dev["name"])
    return sorted(found)


def attach(path: str | os.PathLike[str], *, read_only: bool = False,
           direct_io: bool = False) -> str:
    """Attach a file to a free loop device; returns /dev/loopN.

    Never with -P: a partition scan would create devices that nothing tears down.
    direct_io: the loop reads and writes its file with O_DIRECT, one call per request (a
    buffered loop calls the file once per 4 KiB page: each one a FUSE request on a FUSE file).
    """
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    if direct_io:
        argv.append("--direct-io=on")
    argv.append(str(path))
    res = command.run(argv, error=StackError, what=f"attaching {path} to a loop device")
    dev = res.stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise StackError(f"losetup gave no loop device for {path}: {dev!r}", argv=argv)
    return dev


def detach(dev: str, *, wait: float = 10.0) -> None:
    """Detach a loop device and wait (up to `wait` s) until the kernel lets go of its file.

    A no-op when dev is not attached. The kernel defers the detach while the device is open;
    after `wait` seconds this returns anyway (the detach then completes on last close).
    """
    if backing_file(dev) is None:
        return
    command.run(["losetup", "--detach", dev], error=StackError, what=f"detaching {dev}")
    deadline = time.monotonic() + wait
    while backing_file(dev) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
