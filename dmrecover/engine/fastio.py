"""Reads that never wait for a disk: the presentation's fast path (see PseudoVolume.read_nowait)."""

from __future__ import annotations

import os


def pread_nowait(fd: int, offset: int, length: int) -> bytes | None:
    """`length` bytes at `offset` of fd if the page cache holds them all, else None (never
    waits for a disk; None on any error too: the caller falls back to a blocking read)."""
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the file cannot say
        return None
    return bytes(buf) if n == length else None
