"""Block devices and image files: size, zeroing, holders, filesystem signature, and the
checks a restore destination must pass.

Everything identifies a block device by its major:minor number, never by its name, so
/dev/disk/by-id links, /dev/mapper names and /dev/dm-N all resolve to the same device.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from pathlib import Path

from dmrecover.errors import DeviceError
from dmrecover.system import command
from dmrecover.system.loops import loop_of
from dmrecover.system.mounts import mounts_of
from dmrecover.system.processes import processes_using
from dmrecover.system.sysfs import devnum, holders_of, stat_path
from dmrecover.units import article

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F


def is_block_device(path: str | os.PathLike[str]) -> bool:
    """True when path exists and is a block device (symlinks followed)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def size_of(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device (BLKGETSIZE64) or a regular file (st_size)."""
    st = stat_path(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path} is neither a block device nor a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise DeviceError(f"cannot open {path}: {err.strerror}") from err
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    finally:
        os.close(fd)


def block_size_of_fd(fd: int) -> int:
    """Size of an open block device or file."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    return st.st_size


def zero_out(fd: int, offset: int, length: int) -> bool:
    """BLKZEROOUT a range of an open block device; False when the device cannot do it."""
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        return True
    except OSError as err:
        log.debug("BLKZEROOUT failed (%s); writing zeros", err)
        return False


def holders(path: str | os.PathLike[str]) -> list[str]:
    """Devices stacked on the block device (dm, md, ... from sysfs holders/); for a regular
    file, the loop devices it backs."""
    num = devnum(path)
    if num is None:
        return loop_of(path)
    return holders_of(*num)


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The filesystem (or other) signature blkid finds on a device or image, else None."""
    res = command.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)], check=False)
    if res.returncode == 0 and res.stdout.strip():
        return res.stdout.strip().splitlines()[0]
    return None


def check_writable_destination(path: str | os.PathLike[str], min_size: int,
                               force: bool = False, claimed: bool = False) -> None:
    """Refuse a destination that cannot safely be overwritten with `min_size` bytes.

    A block device must exist and be large enough; a regular file may be missing (its directory
    must exist) and is resized. Either must not be mounted, held (dm/md/loop), or open in
    another process, and must not hold a filesystem unless force. claimed: this process
    holds DEST's claim (system.claims: an O_EXCL open for a device), the kernel's check.
    """
    p = Path(path)
    if not p.exists():
        if p.is_symlink() or str(path).startswith("/dev/"):
            raise DeviceError(f"destination {path} does not exist", hint="check the device name")
        if not p.parent.is_dir():
            raise DeviceError(f"destination {path}: directory {p.parent} does not exist")
        if not os.access(p.parent, os.W_OK):
            raise DeviceError(f"destination {path}: cannot create a file in {p.parent}",
                              hint="check permissions")
        return
    st = stat_path(p)
    if stat.S_ISBLK(st.st_mode):
        size = size_of(p)
        if size < min_size:
            raise DeviceError(f"destination {path} is too small: {size} bytes, the backup "
                              f"needs {min_size}", hint="use a device at least as large")
    elif not stat.S_ISREG(st.st_mode):
        raise DeviceError(f"destination {path} is neither a block device nor a regular file")
    elif not os.access(p, os.W_OK):
        raise DeviceError(f"destination {path} is not writable", hint="check permissions")
    mounts = mounts_of(p)
    if mounts:
        raise DeviceError(f"destination {path} is mounted on {', '.join(mounts)}",
                          hint="unmount it first")
    held = holders(p)
    if held:
        raise DeviceError(f"destination {path} is held by {', '.join(held)}",
                          hint="remove the device stacked on it (or detach the loop) first")
    users = processes_using(p)
    if users:
        who = ", ".join(f"{name} (pid {pid})" for pid, name in users[:5])
        raise DeviceError(f"destination {path} is open in {who}",
                          hint="stop those processes first")
    if stat.S_ISBLK(st.st_mode) and not claimed:
        # The kernel's own claim check: fails for a device mounted, swapped on, or in dm/md.
        try:
            os.close(os.open(p, os.O_RDONLY | os.O_EXCL))
        except OSError as err:
            raise DeviceError(f"destination {path} is in use ({err.strerror})",
                              hint="unmount it or stop what uses it") from err
    if not force and (stat.S_ISBLK(st.st_mode) or st.st_size > 0):
        fs = filesystem_type(p)
        if fs:
            raise DeviceError(f"destination {path} holds {article(fs)} filesystem",
                              hint="use --force to overwrite it")
