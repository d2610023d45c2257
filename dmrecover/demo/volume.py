"""Sample volumes: an image file with a real filesystem, filled by the caller.

The demo and the benchmarks build their volumes the same way: a sparse image of the asked size,
a filesystem on it, mounted through a loop device on a directory beside it while `fill` writes
the data, unmounted again before they use it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from dmrecover.errors import UsageError
from dmrecover.system import command
from dmrecover.system.mounts import mount, umount

T = TypeVar("T")

FSTYPES = ("ext4", "xfs")
# mkfs.xfs >= 5.19 refuses filesystems under 300 MB unless it believes it runs under fstests.
XFS_SMALL_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}


def mkfs(path: str | os.PathLike[str], fstype: str = "ext4", label: str = "sample") -> None:
    """Make an ext4 or xfs filesystem on a file or device (small sizes allowed)."""
    if fstype == "ext4":
        command.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], timeout=600)
    elif fstype == "xfs":
        command.run(["mkfs.xfs", "-q", "-f", "-L", label, str(path)], env=XFS_SMALL_ENV,
                    timeout=600)
    else:
        raise UsageError(f"unknown filesystem type {fstype!r}", hint=f"one of {FSTYPES}")


@contextmanager
def mounted_image(image: str | os.PathLike[str], fstype: str, *, read_only: bool = False,
                  target: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """The filesystem in `image` mounted through a loop device on `target` (default: a new
    directory beside the image, removed afterwards); unmounted at the end."""
    made = target is None
    mnt = Path(tempfile.mkdtemp(prefix="mnt.", dir=Path(image).parent) if made else target)
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        mount(str(image), str(mnt), fstype, ["loop"] + (["ro"] if read_only else []))
        try:
            yield mnt
        finally:
            umount(str(mnt))
    finally:
        if made:
            mnt.rmdir()


def build_sample_volume(path: str | os.PathLike[str], size: int, fill: Callable[[Path], T], *,
                        fstype: str = "ext4", label: str = "sample") -> T:
    """A sparse image of `size` bytes at `path` with an `fstype` filesystem labelled `label`;
    `fill(mountpoint)` writes the data while it is mounted. Returns what `fill` returns."""
    with open(path, "wb") as f:
        f.truncate(size)
    mkfs(path, fstype, label)
    with mounted_image(path, fstype) as mnt:
        result = fill(mnt)
    return result


def file_digest(path: str | os.PathLike[str], size: int | None = None) -> str:
    """SHA-256 of a file (of its first `size` bytes when given), read in 4 MiB blocks."""
    h = hashlib.sha256()
    left = size if size is not None else 1 << 62
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(min(4 << 20, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()
