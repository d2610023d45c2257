"""Low-level DEST I/O: zeroing a range of a regular file cheaply; and the C allocator's arena
limit (limit_malloc_arenas)."""

from __future__ import annotations

import ctypes
import errno
import os

from dmrecover.errors import DeviceError
from dmrecover.system import libc

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_ZERO_RANGE = 0x10


def reads_as_zeros(fd: int, offset: int, length: int) -> bool:
    """True when a regular file has no data in [offset, offset+length): a hole, or (ext4, xfs)
    an unwritten preallocated extent. Zeroing it again would change nothing a read sees, and
    ZERO_RANGE would allocate the blocks of a hole: a sparse 1 TiB DEST whose zero chunks
    were "zeroed" filled this host's disk."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as err:
        return err.errno == errno.ENXIO  # no data after offset at all


def zero_range(fd: int, offset: int, length: int) -> bool:
    """fallocate(ZERO_RANGE|KEEP_SIZE) on a regular file; False when unsupported. Not a
    punched hole: DEST was preallocated so that nothing written later can meet a full
    filesystem, and its blocks stay allocated."""
    fallocate = libc.function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64)
    if fallocate is None:
        return False
    rc = fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        e = libc.errno()
        if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise DeviceError(f"zeroing a range of DEST failed: {os.strerror(e)}")
    return True


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas for this process (mallopt M_ARENA_MAX); False where the C
    library has no such setting.

    The engine decompresses and verifies 4 MiB chunks in several threads (restorer workers,
    on-demand readers, the DEST writer). glibc gives each thread its own arena, and once a
    freed 4 MiB buffer has raised its dynamic mmap threshold, later ones come from those
    arenas and stay mapped there: the session's peak RSS at 1 TiB grew from 125-141 to
    218-302 MiB with the DEST writer thread (bench/bench_scale.py --sizes 1T). Python holds
    the GIL around most allocations, so one arena costs next to no contention: 130 MiB at
    1 TiB with it, and unlike a fixed mmap threshold (116 MiB) no mmap and page faults per
    chunk. It applies to threads that have not allocated yet: call it before starting them."""
    mallopt = libc.function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:  # not glibc
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))
