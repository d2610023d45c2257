"""device-mapper ioctls issued in-process on /dev/mapper/control: the table swaps.

A table swap under a running application must pause its I/O as briefly as possible. Through
`dmsetup` every step is a process start (about 100 ms each on emulated CPUs, all of it inside
the pause when the device is suspended first), so the swaps talk to the kernel directly, the
way libdevmapper does (linux/dm-ioctl.h, interface version 4):

    struct dm_ioctl (312 bytes: version, data_size, data_start, target_count, open_count,
                     flags, event_nr, padding, dev, name[128], uuid[129], data[7])
    then, for DM_TABLE_LOAD and DM_TABLE_STATUS, dm_target_spec entries (40 bytes: start,
    length, status, next, target_type[16]) each followed by its NUL-terminated parameter
    string, padded to 8 bytes; `next` is the offset of the next entry from this one (load)
    or from the start of the data (status).

`swap()` is the one way a live table is replaced (dm-snapshot's online cutover, dm-clone's
online cutover, the dm origin's reloads). Everything else (create, remove, message, anything
that waits for udev) stays with `dmsetup` (dmsetup.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.errors import StackError

log = logging.getLogger(__name__)

CONTROL = "/dev/mapper/control"

# linux/dm-ioctl.h
DM_VERSION = (4, 0, 0)  # the oldest interface with every command used here
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16
DM_IOCTL = 0xFD
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7x")  # struct dm_ioctl
SPEC = struct.Struct("=QQiI16s")  # struct dm_target_spec
ALIGN = 8

DM_VERSION_CMD = 0
DM_DEV_SUSPEND_CMD = 6
DM_DEV_STATUS_CMD = 7
DM_TABLE_LOAD_CMD = 9
DM_TABLE_CLEAR_CMD = 10
DM_TABLE_STATUS_CMD = 12

DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_STATUS_TABLE_FLAG = 1 << 4
DM_ACTIVE_PRESENT_FLAG = 1 << 5
DM_INACTIVE_PRESENT_FLAG = 1 << 6
DM_BUFFER_FULL_FLAG = 1 << 8
DM_SKIP_LOCKFS_FLAG = 1 << 10
DM_NOFLUSH_FLAG = 1 << 11

# libdevmapper's udev flags travel in event_nr's upper 16 bits (the uevent's DM_COOKIE): a
# primary-source event without a cookie to wait on, as `dmsetup --noudevsync resume` sends,
# so the dm udev rules treat the change event as real, not spurious.
DM_UDEV_FLAGS_SHIFT = 16
DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040
RESUME_EVENT_NR = (DM_UDEV_PRIMARY_SOURCE_FLAG
                   | DM_UDEV_DISABLE_LIBRARY_FALLBACK) << DM_UDEV_FLAGS_SHIFT

#: Buffer for commands that return data (libdevmapper's minimum); doubled on BUFFER_FULL.
STATUS_BUFFER = 16 * 1024
MAX_BUFFER = 64 * 1024 * 1024


def ioctl_number(cmd: int) -> int:
    """_IOWR(DM_IOCTL, cmd, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (DM_IOCTL << 8) | cmd


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


# ---------------------------------------------------------------------------------------------
# packing (pure: unit-tested against known byte layouts)


def pack_header(name: str, *, data_size: int, flags: int = 0, target_count: int = 0,
                event_nr: int = 0) -> bytearray:
    """A zeroed buffer of data_size bytes starting with a struct dm_ioctl naming `name`."""
    raw = name.encode()
    if not raw or len(raw) >= DM_NAME_LEN or b"\0" in raw or b"/" in raw:
        raise StackError(f"device-mapper name {name!r} is not usable (1-127 bytes, no '/')")
    if data_size < HEADER.size:
        raise ValueError("data_size below sizeof(struct dm_ioctl)")
    buf = bytearray(data_size)
    HEADER.pack_into(buf, 0, *DM_VERSION, data_size, HEADER.size, target_count, 0, flags,
                     event_nr, 0, 0, raw, b"")
    return buf


@dataclass(frozen=True)
class Target:
    """One table line: start and length in 512-byte sectors, target type, parameters."""

    start: int
    length: int
    type: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.type} {self.params}".rstrip()


def parse_table(table: str | list[str]) -> list[Target]:
    """Table text (dmsetup's format, one target a line) as Targets; StackError when bad."""
    lines = table.splitlines() if isinstance(table, str) else [x for t in table
                                                               for x in t.splitlines()]
    out = []
    for line in lines:
        if not line.strip():
            continue
        parts = line.split(None, 3)
        try:
            start, length = int(parts[0]), int(parts[1])
            ttype = parts[2]
        except (IndexError, ValueError):
            raise StackError(f"bad device-mapper table line {line.strip()!r}",
                             hint="want: <start> <length> <target> <parameters>") from None
        if start < 0 or length <= 0 or len(ttype.encode()) >= DM_MAX_TYPE_NAME:
            raise StackError(f"bad device-mapper table line {line.strip()!r}")
        out.append(Target(start, length, ttype, parts[3].strip() if len(parts) > 3 else ""))
    if not out:
        raise StackError("empty device-mapper table")
    return out


def pack_targets(targets: list[Target]) -> bytes:
    """The dm_target_spec entries of a DM_TABLE_LOAD, each `next` relative to itself.

    A backslash is the kernel's escape character in parameters (dm_split_args): doubled, as
    libdevmapper does, so it reaches the target as written.
    """
    out = bytearray()
    for t in targets:
        params = t.params.replace("\\", "\\\\").encode() + b"\0"
        size = _align(SPEC.size + len(params))
        entry = bytearray(size)
        SPEC.pack_into(entry, 0, t.start, t.length, 0, size, t.type.encode())
        entry[SPEC.size:SPEC.size + len(params)] = params
        out += entry
    return bytes(out)


def load_buffer(name: str, targets: list[Target], *, read_only: bool) -> bytearray:
    """The whole DM_TABLE_LOAD argument: header, then the targets at data_start."""
    specs = pack_targets(targets)
    buf = pack_header(name, data_size=HEADER.size + len(specs),
                      flags=DM_READONLY_FLAG if read_only else 0, target_count=len(targets))
    buf[HEADER.size:] = specs
    return buf


@dataclass(frozen=True)
class DevStatus:
    """What the kernel returns in struct dm_ioctl for a device."""

    name: str
    uuid: str
    flags: int
    open_count: int
    target_count: int
    event_nr: int
    dev: int
    data_size: int
    data_start: int
    version: tuple[int, int, int]

    @property
    def suspended(self) -> bool:
        return bool(self.flags & DM_SUSPEND_FLAG)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & DM_READONLY_FLAG)

    @property
    def inactive_table(self) -> bool:
        """A loaded table waits for the next resume."""
        return bool(self.flags & DM_INACTIVE_PRESENT_FLAG)

    @property
    def major(self) -> int:
        return os.major(self.dev)

    @property
    def minor(self) -> int:
        return os.minor(self.dev)


def unpack_header(buf: bytes | bytearray) -> DevStatus:
    (v0, v1, v2, data_size, data_start, target_count, open_count, flags, event_nr, _pad, dev,
     name, uuid) = HEADER.unpack_from(buf, 0)
    return DevStatus(name=name.split(b"\0", 1)[0].decode(errors="replace"),
                     uuid=uuid.split(b"\0", 1)[0].decode(errors="replace"), flags=flags,
                     open_count=open_count, target_count=target_count, event_nr=event_nr,
                     dev=dev, data_size=data_size, data_start=data_start,
                     version=(v0, v1, v2))


def unpack_targets(buf: bytes | bytearray) -> list[Target]:
    """The targets a DM_TABLE_STATUS returned (`next` relative to data_start)."""
    st = unpack_header(buf)
    out = []
    end = min(st.data_size, len(buf))
    pos = st.data_start
    for _ in range(st.target_count):
        if pos + SPEC.size > end:
            break
        start, length, _status, nxt, ttype = SPEC.unpack_from(buf, pos)
        params = bytes(buf[pos + SPEC.size:end]).split(b"\0", 1)[0].decode(errors="replace")
        out.append(Target(start, length, ttype.split(b"\0", 1)[0].decode(), params))
        pos = st.data_start + nxt
    return out


# ---------------------------------------------------------------------------------------------
# the ioctls


_HINTS = {
    errno.ENXIO: "the device does not exist (see `dmsetup ls`)",
    errno.EINVAL: "the kernel log (dmesg) says what it refused",
    errno.EBUSY: "something holds the device (see `dmsetup info`)",
    errno.EPERM: "run dmrecover as root",
    errno.EACCES: "run dmrecover as root",
    errno.ENOENT: "load the dm-mod module (/dev/mapper/control is missing)",
}

_NAMES = {DM_VERSION_CMD: "DM_VERSION", DM_DEV_SUSPEND_CMD: "DM_DEV_SUSPEND",
          DM_DEV_STATUS_CMD: "DM_DEV_STATUS", DM_TABLE_LOAD_CMD: "DM_TABLE_LOAD",
          DM_TABLE_CLEAR_CMD: "DM_TABLE_CLEAR", DM_TABLE_STATUS_CMD: "DM_TABLE_STATUS"}


def _ioctl(cmd: int, buf: bytearray, *, what: str, name: str) -> bytearray:
    """Issue one dm ioctl with buf (in and out); StackError with the errno on failure."""
    op = _NAMES.get(cmd, str(cmd))
    log.debug("ioctl: %s %s (flags %#x, %d bytes)", op, name,
              HEADER.unpack_from(buf, 0)[7], len(buf))
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise StackError(f"{what}: cannot open {CONTROL}: {err.strerror}",
                         hint=_HINTS.get(err.errno or 0)) from err
    try:
        # Mutable buffer: the kernel writes its answer into it (the GIL is released meanwhile).
        fcntl.ioctl(fd, ioctl_number(cmd), buf, True)
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0, str(err.errno))
        log.info("failed (%s): ioctl %s %s", code, op, name)
        raise StackError(f"{what} failed: {op} on {name}: {err.strerror} ({code})",
                         hint=_HINTS.get(err.errno or 0, "the kernel log (dmesg) says why"),
                         returncode=err.errno) from err
    finally:
        os.close(fd)
    return buf


def dev_status(name: str) -> DevStatus | None:
    """The device's state (DM_DEV_STATUS); None when it does not exist."""
    try:
        buf = _ioctl(DM_DEV_STATUS_CMD, pack_header(name, data_size=HEADER.size),
                     what=f"status of {name}", name=name)
    except StackError as err:
        if err.returncode == errno.ENXIO:
            return None
        raise
    return unpack_header(buf)


def suspend(name: str, *, flush: bool = True, lockfs: bool = False) -> None:
    """Suspend a device: waits for its in-flight I/O, then holds new I/O.

    flush=False: DM_NOFLUSH_FLAG (targets may requeue rather than complete in-flight I/O).
    lockfs: freeze the filesystem on it first (what `dmsetup suspend` does by default); a
    swap to a table showing the same data has no need for it.
    """
    flags = DM_SUSPEND_FLAG | (0 if flush else DM_NOFLUSH_FLAG)
    flags |= 0 if lockfs else DM_SKIP_LOCKFS_FLAG
    _ioctl(DM_DEV_SUSPEND_CMD, pack_header(name, data_size=HEADER.size, flags=flags),
           what=f"suspending {name}", name=name)


def resume(name: str, *, lockfs: bool = False) -> DevStatus:
    """Resume a device. With a loaded table the kernel suspends it (if it runs), swaps the
    tables and resumes, all in this one call. Sends the change uevent; waits for no udev."""
    flags = 0 if lockfs else DM_SKIP_LOCKFS_FLAG
    buf = _ioctl(DM_DEV_SUSPEND_CMD, pack_header(name, data_size=HEADER.size, flags=flags,
                                                 event_nr=RESUME_EVENT_NR),
                 what=f"resuming {name}", name=name)
    return unpack_header(buf)


def load(name: str, table: str | list[str], *, read_only: bool = False) -> None:
    """Load a table inactive (DM_TABLE_LOAD); it goes live at the next resume.

    read_only: the table opens its devices read-only (DM_READONLY_FLAG), as a device created
    read-only needs."""
    targets = parse_table(table)
    _ioctl(DM_TABLE_LOAD_CMD, load_buffer(name, targets, read_only=read_only),
           what=f"loading a table into {name}", name=name)


def clear(name: str) -> None:
    """Drop a loaded, inactive table (DM_TABLE_CLEAR); the live one stays."""
    _ioctl(DM_TABLE_CLEAR_CMD, pack_header(name, data_size=HEADER.size),
           what=f"clearing the inactive table of {name}", name=name)


def table_status(name: str, *, table: bool = False) -> list[Target]:
    """The live table's status lines (table=True: the table itself, as `dmsetup table`).

    Retried with a bigger buffer while the kernel says it did not fit (DM_BUFFER_FULL_FLAG)."""
    size = STATUS_BUFFER
    while True:
        buf = _ioctl(DM_TABLE_STATUS_CMD,
                     pack_header(name, data_size=size,
                                 flags=DM_STATUS_TABLE_FLAG if table else 0),
                     what=f"{'table' if table else 'status'} of {name}", name=name)
        if not unpack_header(buf).flags & DM_BUFFER_FULL_FLAG:
            return unpack_targets(buf)
        if size >= MAX_BUFFER:
            raise StackError(f"the status of {name} does not fit in {MAX_BUFFER} bytes")
        size *= 2


# ---------------------------------------------------------------------------------------------
# the swap


@dataclass(frozen=True)
class Swap:
    """One table swap: the I/O pause and its parts (seconds), and when it ran (monotonic)."""

    name: str
    pause: float
    suspend: float  # suspend_first only: the suspend ioctl (flush of in-flight I/O)
    load: float  # the table load (inside the pause only with suspend_first)
    resume: float  # the resume ioctl (suspend + swap + resume when not suspended first)
    start: float
    end: float

    def as_dict(self) -> dict:
        return {"pause_ms": round(self.pause * 1000, 3),
                "suspend_ms": round(self.suspend * 1000, 3),
                "load_ms": round(self.load * 1000, 3),
                "resume_ms": round(self.resume * 1000, 3)}


#: How often a device a failed swap left suspended is resumed again, 0.2 s apart.
RESUME_ATTEMPTS = 50


def swap(name: str, table: str | list[str], *, suspend_first: bool, read_only: bool = False,
         loaded: Callable[[], None] | None = None, settle: bool = True,
         lockfs: bool = False) -> Swap:
    """Replace a live device's table under running I/O; returns what the pause was made of.

    suspend_first=False: load the table while I/O goes on, then one resume, in which the
    kernel suspends the device (waiting for its in-flight I/O), swaps the tables and resumes
    it: the pause is that one call. suspend_first=True: for a table whose constructor reads
    state the old table still writes (snapshot-merge reading the COW on another origin):
    suspend, load, resume, all three inside the pause.

    A failed load keeps the old table live (and resumes a device suspended for it). A failed
    swap drops the new table and resumes the device on the old one, retried: the device is
    never left suspended unless the kernel refuses to resume it at all (then StackError says
    so). `loaded` runs with the new table loaded, before the swap (a test holds it there).
    settle: wait for udev's change event of this resume (where udevd runs), so nothing
    looks at the device while udev's probes hold it.
    lockfs: freeze the filesystem on the device while suspending (dmsetup's default). Off:
    the new table shows the same data as the old, so the filesystem needs no consistent
    point on disk, and a freeze would write back its dirty pages inside the pause. In-flight
    I/O completes before the swap either way; I/O queued meanwhile goes to the new table.
    """
    targets = parse_table(table)
    # The udev monitor starts before the pause (finding the device's UUID costs a dmsetup
    # start): udev's change event of our resume is then waited for, not a blanket settle.
    waiter = dm.change_waiter(name) if settle and dm.use_udevsync() else None
    try:
        result = _swap(name, targets, suspend_first=suspend_first, read_only=read_only,
                       loaded=loaded, lockfs=lockfs)
    except BaseException:
        if waiter is not None:
            waiter.close()
        raise
    if waiter is not None:
        waiter.wait(lambda: dm.mapper_path(name).exists())
    return result


def _swap(name: str, targets: list[Target], *, suspend_first: bool, read_only: bool,
          loaded: Callable[[], None] | None, lockfs: bool) -> Swap:
    """swap() without the udev wait."""
    t_suspend = t_load = 0.0
    if suspend_first:
        t0 = time.monotonic()
        suspend(name, lockfs=lockfs)
        t1 = time.monotonic()
        t_suspend = t1 - t0
        try:
            load(name, [t.line() for t in targets], read_only=read_only)
        except BaseException:
            _resume_after_failure(name)
            raise
        t_load = time.monotonic() - t1
    else:
        t1 = time.monotonic()
        load(name, [t.line() for t in targets], read_only=read_only)
        t_load = time.monotonic() - t1
    if loaded is not None:
        try:
            loaded()
        except BaseException:
            _resume_after_failure(name)
            raise
    t2 = time.monotonic()
    if not suspend_first:
        t0 = t2
    try:
        resume(name, lockfs=lockfs)
    except BaseException:
        # The kernel keeps the device suspended when the swap fails, and gives the new
        # table back as inactive when its suspend fails: drop it, resume on the old table.
        _resume_after_failure(name)
        raise
    t3 = time.monotonic()
    result = Swap(name=name, pause=t3 - t0, suspend=t_suspend, load=t_load, resume=t3 - t2,
                  start=t0, end=t3)
    log.info("swapped the table of %s (%s, %d targets): I/O paused %.1f ms (suspend %.1f, "
             "load %.1f, resume %.1f)", name, targets[0].type, len(targets),
             result.pause * 1000, t_suspend * 1000,
             t_load * 1000 if suspend_first else 0.0, result.resume * 1000)
    return result


def _resume_after_failure(name: str) -> None:
    """Bring a device back on its old table after a failed swap (see swap()): drop a table
    still loaded (else the resume would swap it in), resume it if it is suspended."""
    last: StackError | None = None
    for attempt in range(RESUME_ATTEMPTS):
        try:
            st = dev_status(name)
            if st is None:
                return
            if st.inactive_table:
                clear(name)
            if st.suspended:
                resume(name)
            return
        except StackError as err:
            last = err
            log.error("resuming %s after a failed swap (attempt %d): %s", name, attempt + 1,
                      err)
            time.sleep(0.2)
    raise StackError(f"{name} stays suspended after a failed table swap: I/O to it waits "
                     f"({last.message if last else 'no answer'})",
                     hint=f"run `dmsetup resume {name}`")
