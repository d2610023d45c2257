"""The part of the kernel's FUSE protocol (include/uapi/linux/fuse.h) the server speaks.

Layouts are those of protocol 7.31 (Linux 5.4); the kernel accepts a server that answers with
an older minor than its own and keeps to what that minor defines. Everything is native-endian
(little-endian on the platforms this runs on), as the kernel writes it.
"""

from __future__ import annotations

import struct

MAJOR = 7
MINOR = 31  # what we answer; 7.28 brought max_pages (requests above 128 KiB)

# Opcodes (enum fuse_opcode).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
#: Requests the kernel expects no answer to.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# fuse_init_in/out flags.
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
MAX_PAGES = 1 << 22

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

ROOT_ID = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev
# blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsec nsec
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
RW_IN = struct.Struct("<QQIIQII")  # fh offset size read/write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")  # size padding
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size ... mode . uid gid .
KSTATFS = struct.Struct("<QQQQQIII28x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT = struct.Struct("<QQII")  # ino off namelen type (then the name, padded to 8)

#: ioctl(new_fd, FUSE_DEV_IOC_CLONE, &fd): new_fd serves fd's connection, with its own queue
#: of requests being processed (_IOR(229, 0, uint32_t)).
DEV_IOC_CLONE = 0x8004E500
#: Room in a read of /dev/fuse beyond max_write: the kernel refuses a buffer smaller than a
#: whole request (header and fuse_write_in included) and wants at least 8 KiB.
READ_SLACK = 64 * 1024


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One struct fuse_dirent with its name, padded to a multiple of 8 bytes."""
    raw = DIRENT.pack(ino, off, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)
