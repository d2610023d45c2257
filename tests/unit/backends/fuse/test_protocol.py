"""The FUSE server's answers to the kernel's requests, frame by frame (no /dev/fuse, no root):
struct sizes as linux/fuse.h has them, INIT's negotiation, lookups, reads and writes through a
real PseudoVolume, and errors as errnos."""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
from pathlib import Path

import pytest

from dmrecover.backends.fuse import protocol as fp
from dmrecover.backends.fuse.server import MAX_WRITE, FuseServer
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.engine.source import MemorySource
from dmrecover.errors import CorruptChunk

MiB = 1 << 20


def test_layouts_match_the_kernel_s() -> None:
    # Sizes from include/uapi/linux/fuse.h (FUSE_COMPAT_* aside).
    assert fp.IN_HEADER.size == 40 and fp.OUT_HEADER.size == 16
    assert fp.INIT_OUT.size == 64 and fp.ATTR.size == 88
    assert fp.ENTRY_OUT.size + fp.ATTR.size == 128  # fuse_entry_out
    assert fp.ATTR_OUT.size + fp.ATTR.size == 104  # fuse_attr_out
    assert fp.RW_IN.size == 40 and fp.SETATTR_IN.size == 88 and fp.KSTATFS.size == 80
    assert len(fp.dirent(2, 1, b"volume", 8)) == 32  # 24 + 6, padded to 8
    assert fp.DEV_IOC_CLONE == (2 << 30) | (4 << 16) | (229 << 8)  # _IOR(229, 0, uint32_t)


def request(op: int, node: int, body: bytes = b"", unique: int = 7) -> bytes:
    n = fp.IN_HEADER.size + len(body)
    return fp.IN_HEADER.pack(n, op, unique, node, 0, 0, 1, 0, 0) + body


def ask(srv: FuseServer, op: int, node: int = fp.ROOT_ID, body: bytes = b""
        ) -> tuple[int, bytes]:
    """(errno, payload) of the server's answer, checking the frame's header."""
    req = request(op, node, body)
    reply = srv.answer(req, len(req))
    assert reply is not None
    length, err, unique = fp.OUT_HEADER.unpack(reply[0])
    payload = b"".join(reply[1:])
    assert unique == 7 and length == fp.OUT_HEADER.size + len(payload)
    assert err <= 0 and (err == 0 or payload == b"")
    return -err, payload


@pytest.fixture
def served(tmp_path: Path):
    data = random.Random(1).randbytes(5 * MiB + 4096)
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"\xee" * len(data))
    src = MemorySource(data, MiB)
    pv = PseudoVolume(src, dest, tmp_path / "state")
    srv = FuseServer(pv, tmp_path / "mnt")
    yield srv, data, src
    pv.close()


def init(srv: FuseServer, minor: int = 37, flags: int = 0xFFFFFFFF) -> tuple[int, bytes]:
    return ask(srv, fp.INIT, body=fp.INIT_IN.pack(7, minor, 128 * 1024, flags) + bytes(48))


def test_init_takes_what_the_server_handles(served) -> None:
    srv, _, _ = served
    err, out = init(srv)
    assert err == 0 and len(out) == fp.INIT_OUT.size
    major, minor, ra, flags, bg, _, max_write, _, max_pages, *_ = fp.INIT_OUT.unpack(out)
    assert (major, minor, ra) == (7, fp.MINOR, 128 * 1024)
    assert flags == fp.ASYNC_READ | fp.BIG_WRITES | fp.MAX_PAGES  # nothing it cannot serve
    assert max_write == MAX_WRITE and max_pages * 4096 == MAX_WRITE
    assert bg >= srv.threads
    # A kernel that offers less gets less.
    assert fp.INIT_OUT.unpack(init(srv, flags=fp.ASYNC_READ)[1])[3] == fp.ASYNC_READ
    # One older than 7.31 is refused, and start() is told so.
    assert init(srv, minor=26)[0] == errno.EPROTO
    assert isinstance(srv._error, OSError)


def test_lookup_getattr_readdir_statfs(served) -> None:
    srv, data, _ = served
    err, out = ask(srv, fp.LOOKUP, body=b"volume\0")
    assert err == 0
    node = fp.ENTRY_OUT.unpack_from(out)[0]
    attr = fp.ATTR.unpack_from(out, fp.ENTRY_OUT.size)
    assert attr[0] == node and attr[1] == len(data)
    assert stat.S_ISREG(attr[9]) and attr[9] & 0o777 == 0o600
    assert ask(srv, fp.LOOKUP, body=b"volume2\0")[0] == errno.ENOENT
    assert ask(srv, fp.LOOKUP, node=node, body=b"volume\0")[0] == errno.ENOENT
    err, out = ask(srv, fp.GETATTR, node=fp.ROOT_ID, body=bytes(16))
    assert err == 0 and stat.S_ISDIR(fp.ATTR.unpack_from(out, fp.ATTR_OUT.size)[9])
    assert ask(srv, fp.GETATTR, node=99, body=bytes(16))[0] == errno.ENOENT
    err, out = ask(srv, fp.READDIR, body=fp.RW_IN.pack(0, 0, 4096, 0, 0, 0, 0))
    ino, off, namelen, _ = fp.DIRENT.unpack_from(out)
    assert (ino, off, out[24:24 + namelen]) == (node, 1, b"volume")
    assert ask(srv, fp.READDIR, body=fp.RW_IN.pack(0, 1, 4096, 0, 0, 0, 0)) == (0, b"")
    err, out = ask(srv, fp.STATFS)
    assert err == 0 and fp.KSTATFS.unpack(out)[0] == (len(data) + 4095) // 4096
    assert ask(srv, 39)[0] == errno.ENOSYS  # IOCTL: not served
    assert srv.answer(request(fp.FORGET, node, bytes(8)), 48) is None  # no reply at all


def test_open_setattr_refusals(served) -> None:
    srv, data, _ = served
    node = fp.ROOT_ID + 1
    open_in = struct.Struct("<II")
    err, out = ask(srv, fp.OPEN, node=node, body=open_in.pack(os.O_RDWR, 0))
    assert err == 0 and fp.OPEN_OUT.unpack(out)[1] == fp.FOPEN_DIRECT_IO
    assert ask(srv, fp.OPEN, node=node, body=open_in.pack(os.O_RDWR | os.O_TRUNC, 0))[0] \
        == errno.EPERM
    assert ask(srv, fp.OPEN, node=fp.ROOT_ID, body=open_in.pack(0, 0))[0] == errno.EISDIR

    def setattr(valid: int, size: int = 0, mode: int = 0) -> int:
        body = fp.SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, 0, 0, 0)
        return ask(srv, fp.SETATTR, node=node, body=body)[0]

    assert setattr(fp.FATTR_SIZE, size=4096) == errno.EPERM
    assert setattr(fp.FATTR_SIZE, size=len(data)) == 0
    assert setattr(fp.FATTR_MODE, mode=0o644) == errno.EPERM
    assert setattr(1 << 4) == 0  # atime


def test_read_write_flush_through_the_engine(served) -> None:
    srv, data, src = served
    node = fp.ROOT_ID + 1

    def read(off: int, size: int) -> tuple[int, bytes]:
        return ask(srv, fp.READ, node=node, body=fp.RW_IN.pack(node, off, size, 0, 0, 0, 0))

    assert read(MiB - 100, 200) == (0, data[MiB - 100:MiB + 100])
    assert read(len(data) - 10, 4096) == (0, data[-10:])  # short at the end
    blob = b"\x42" * 8192
    body = fp.RW_IN.pack(node, 2 * MiB + 512, len(blob), 0, 0, 0, 0) + blob
    err, out = ask(srv, fp.WRITE, node=node, body=body)
    assert err == 0 and fp.WRITE_OUT.unpack(out)[0] == len(blob)
    assert read(2 * MiB, 16384)[1] == \
        data[2 * MiB:2 * MiB + 512] + blob + data[2 * MiB + 8704:2 * MiB + 16384]
    assert ask(srv, fp.FSYNC, node=node, body=bytes(16)) == (0, b"")
    body = fp.RW_IN.pack(node, len(data) - 10, 100, 0, 0, 0, 0) + bytes(100)
    assert ask(srv, fp.WRITE, node=node, body=body)[0] == errno.ENOSPC  # the engine's errno
    assert srv.errors == 1

    def corrupt(index: int) -> bytes:
        raise CorruptChunk(f"chunk {index} fails its check")

    src.read_chunk = corrupt  # type: ignore[method-assign]
    assert read(4 * MiB, 4096) == (errno.EIO, b"")  # never bad bytes, never a dead thread
    assert srv.errors == 2


def test_a_read_only_server_takes_no_write(served) -> None:
    srv, _, _ = served
    srv.read_only = True
    node = fp.ROOT_ID + 1
    assert ask(srv, fp.OPEN, node=node, body=struct.pack("<II", os.O_WRONLY, 0))[0] \
        == errno.EROFS
    body = fp.RW_IN.pack(node, 0, 4, 0, 0, 0, 0) + b"abcd"
    assert ask(srv, fp.WRITE, node=node, body=body)[0] == errno.EROFS
