"""Block device numbers and what sysfs says about them.

A block device is identified by its major:minor number, never by its name, so
/dev/disk/by-id links, /dev/mapper names and /dev/dm-N all resolve to the same device.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dmrecover.errors import DeviceError


def stat_path(path: str | os.PathLike[str]) -> os.stat_result:
    """os.stat, with DeviceError naming the path when it is missing or unreadable."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"{path} does not exist", hint="check the path") from None
    except OSError as err:
        raise DeviceError(f"cannot stat {path}: {err.strerror}") from err


def devnum(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(major, minor) of a block device, None for anything else (a regular file...)."""
    st = stat_path(path)
    if stat.S_ISBLK(st.st_mode):
        return os.major(st.st_rdev), os.minor(st.st_rdev)
    return None


def with_partitions(major: int, minor: int) -> set[tuple[int, int]]:
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


def holders_of(major: int, minor: int) -> list[str]:
    """Devices stacked on a block device or its partitions (sysfs holders/: dm, md...)."""
    out: set[str] = set()
    for ma, mi in with_partitions(major, minor):
        try:
            out.update(f"/dev/{h.name}" for h in Path(f"/sys/dev/block/{ma}:{mi}/holders")
                       .iterdir())
        except OSError:
            pass
    return sorted(out)


def dm_nodes_with_uuid_prefix(prefix: str) -> list[str]:
    """/dev/dm-N of every device-mapper device whose UUID starts with `prefix` (sysfs)."""
    out = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return []
    for name in sorted(names):
        if not name.startswith("dm-"):
            continue
        try:
            with open(f"/sys/block/{name}/dm/uuid") as f:
                if f.read().strip().startswith(prefix):
                    out.append(f"/dev/{name}")
        except OSError:
            continue
    return out


XFS_SYSFS = "/sys/fs/xfs"


def _xfs_error_dir(dev: str, root: str) -> str:
    return os.path.join(root, os.path.basename(os.path.realpath(dev)), "error", "metadata")


def xfs_on(dev: str, *, root: str = XFS_SYSFS) -> bool:
    """True when an XFS is mounted (or being mounted) on block device `dev`."""
    return os.path.isdir(_xfs_error_dir(dev, root))


def xfs_stop_retrying(dev: str, *, root: str = XFS_SYSFS) -> bool:
    """Make the XFS on block device `dev` give up on failed metadata writes at once.

    XFS retries a failed asynchronous metadata write for ever by default (error/metadata/EIO/
    max_retries = -1). On a loop over a FUSE file whose server died that never succeeds: a
    mount doing log recovery then waits in D state for good, holds its superblock lock, and
    every sync(2) on the host waits with it. Setting max_retries to 0 for every error class
    makes XFS shut the filesystem down instead, so the mount fails (or the mounted filesystem
    can be unmounted) and the loop is let go. Only for a dead session's devices (or a stack
    `abort --force` took down under strays): on a healthy device nothing fails, so nothing
    changes, but one transient error would then shut the filesystem down.
    Returns True when an XFS (mounted or being mounted) was found on dev.
    """
    base = _xfs_error_dir(dev, root)
    try:
        classes = os.listdir(base)
    except FileNotFoundError:
        return False
    for cls in classes:
        try:
            with open(os.path.join(base, cls, "max_retries"), "w") as f:
                f.write("0")
        except FileNotFoundError:
            pass  # the filesystem went away meanwhile
    return True
