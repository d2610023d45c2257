"""Block devices and image files: size, mounted?, holders, open-by, loop attach/detach.

Everything identifies a block device by its major:minor number, never by its name, so
/dev/disk/by-id links, /dev/mapper names and /dev/dm-N all resolve to the same device.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from dmrecover.errors import DeviceError, StackError
from dmrecover.system import command

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F


def _stat(path: str | os.PathLike[str]) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist", hint="check the path") from None
    except OSError as err:
        raise DeviceError(f"cannot stat {path}: {err.strerror}") from err


def is_block_device(path: str | os.PathLike[str]) -> bool:
    """True when path exists and is a block device (symlinks followed)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def size_of(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device (BLKGETSIZE64) or a regular file (st_size)."""
    st = _stat(path)
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


def _devnum(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    st = _stat(path)
    if stat.S_ISBLK(st.st_mode):
        return os.major(st.st_rdev), os.minor(st.st_rdev)
    return None


def _with_partitions(major: int, minor: int) -> set[tuple[int, int]]:
    """The device and its partitions (a mounted sda1 makes sda busy too)."""
    nums = {(major, minor)}
    base = Path(f"/sys/dev/block/{major}:{minor}")
    try:
        for child in base.iterdir():
            dev = child / "dev"
            if (child / "partition").exists() and dev.exists():
                ma, mi = dev.read_text().strip().split(":")
                nums.add((int(ma), int(mi)))
    except OSError:
        pass
    return nums


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


@dataclass
class _Mount:
    major: int
    minor: int
    mountpoint: str
    source: str


def _mountinfo() -> list[_Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            try:
                sep = parts.index("-")
                ma, mi = parts[2].split(":")
                out.append(_Mount(int(ma), int(mi), _unescape(parts[4]),
                                  _unescape(parts[sep + 2])))
            except (ValueError, IndexError):
                continue
    return out


def loop_of(file: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is `file` (matched by inode and device), maybe none."""
    st = _stat(file)
    if not stat.S_ISREG(st.st_mode):
        return []
    if not any((loop / "loop").is_dir() for loop in Path("/sys/block").glob("loop*")):
        return []  # no loop device attached at all: spare the losetup call
    # Match by inode and device, not by path (paths may be relative, renamed or deleted).
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


def mounts_of(path: str | os.PathLike[str]) -> list[str]:
    """Mount points that use the block device (or its partitions), or a loop over the file."""
    num = _devnum(path)
    if num is None:
        return [mp for loop in loop_of(path) for mp in mounts_of(loop)]
    nums = _with_partitions(*num)
    return sorted({m.mountpoint for m in _mountinfo() if (m.major, m.minor) in nums})


def holders(path: str | os.PathLike[str]) -> list[str]:
    """Devices stacked on the block device (dm, md, ... from sysfs holders/); for a regular
    file, the loop devices it backs."""
    num = _devnum(path)
    if num is None:
        return loop_of(path)
    out: set[str] = set()
    for ma, mi in _with_partitions(*num):
        hdir = Path(f"/sys/dev/block/{ma}:{mi}/holders")
        try:
            out.update(f"/dev/{h.name}" for h in hdir.iterdir())
        except OSError:
            pass
    return sorted(out)


def processes_using(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(pid, name) of other processes with the device or file open (or mapped).

    psutil lists the processes; the open descriptors are matched by identity (st_rdev for a
    device, st_dev+st_ino for a file) because psutil's open_files() skips block devices.
    """
    import psutil

    st = _stat(path)
    if stat.S_ISBLK(st.st_mode):
        def same(s: os.stat_result) -> bool:
            return stat.S_ISBLK(s.st_mode) and s.st_rdev == st.st_rdev
    else:
        def same(s: os.stat_result) -> bool:
            return s.st_dev == st.st_dev and s.st_ino == st.st_ino
    me = os.getpid()
    users: list[tuple[int, str]] = []
    for proc in psutil.process_iter(["pid", "name"]):
        pid = proc.info["pid"]
        if pid == me:
            continue
        fddir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            try:
                if same(os.stat(f"{fddir}/{fd}")):
                    users.append((pid, proc.info["name"] or "?"))
                    break
            except OSError:
                continue
    return users


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The filesystem (or other) signature blkid finds on a device or image, else None."""
    res = command.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)], check=False)
    if res.returncode == 0 and res.stdout.strip():
        return res.stdout.strip().splitlines()[0]
    return None


def check_writable_destination(path: str | os.PathLike[str], min_size: int,
                               force: bool = False) -> None:
    """Refuse a destination that cannot safely be overwritten with `min_size` bytes.

    A block device must exist and be large enough; a regular file may be missing (its directory
    must exist) and is resized. Either must not be mounted, held (dm/md/loop), or open in
    another process, and must not hold a filesystem unless force.
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
    st = _stat(p)
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
    if stat.S_ISBLK(st.st_mode):
        # The kernel's own claim check: fails for a device mounted, swapped on, or in dm/md.
        try:
            os.close(os.open(p, os.O_RDONLY | os.O_EXCL))
        except OSError as err:
            raise DeviceError(f"destination {path} is in use ({err.strerror})",
                              hint="unmount it or stop what uses it") from err
    if not force and (stat.S_ISBLK(st.st_mode) or st.st_size > 0):
        fs = filesystem_type(p)
        if fs:
            raise DeviceError(f"destination {path} holds a {fs} filesystem",
                              hint="use --force to overwrite it")


# ---------------------------------------------------------------- loop devices


def loop_attach(path: str | os.PathLike[str], read_only: bool = False,
                direct_io: bool = False) -> str:
    """Attach a file to a free loop device; returns /dev/loopN."""
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


def loop_detach(dev: str) -> None:
    """Detach a loop device (the kernel defers it while the device is still open)."""
    command.run(["losetup", "--detach", dev], error=StackError, what=f"detaching {dev}")
