"""Presents a PseudoVolume as one file on a FUSE mount, speaking the kernel's protocol on
/dev/fuse itself (backends/fuse/protocol.py).

The mount directory holds a single regular file (default name `volume`) the size of the
volume; `losetup` attaches it and the filesystem is mounted from the loop device. A fixed pool
of threads serves the connection, each reading requests from its own clone of the /dev/fuse
descriptor and running the engine call itself: a request that blocks (an on-demand fetch, a
cold DEST read, a flush) holds one thread, the others go on serving. fsync and flush map to
`PseudoVolume.flush()`: when the loop device forwards a flush, it returns once the writes are
durable.

Why not pyfuse3 (libfuse + trio), which served it before: a 4 KiB read paid for libfuse's
dispatch, a trio task and a hand-off to a worker thread and back (docs/architecture.md,
Performance); here a request costs one read(2) of /dev/fuse, a struct unpack, the engine call
and one writev(2). Measured on this host with the same handler (fio, 4 KiB random reads at depth
16 on the loop): 24k IOPS through pyfuse3, 41k here.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmrecover.backends.fuse import protocol as fp
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.errors import DmrecoverError, StackError
from dmrecover.system import loops
from dmrecover.system.mounts import fuse_unmount, is_mountpoint, mount_fuse

log = logging.getLogger(__name__)

_FILE_ID = fp.ROOT_ID + 1
_TIMEOUT = 3600  # seconds the kernel may cache names and attributes: nothing changes them
MAX_WRITE = 1 << 20  # bytes per FUSE request (the loop's 1 MiB requests go whole)


class FuseServer:
    """Serve `volume` as `mountdir/name` from a pool of threads of this process.

    start() mounts and returns once the file answers; stop() unmounts (the loop device on the
    file must be detached first). direct_io (default True) bypasses the page cache of the FUSE
    file, so the loop device above does not cache everything twice. `threads` is how many
    requests are served at once (each blocking one, such as a fetch, holds one).
    """

    def __init__(self, volume: PseudoVolume, mountdir: str | os.PathLike[str], *,
                 name: str = "volume", read_only: bool = False, direct_io: bool = True,
                 threads: int = 16) -> None:
        self.volume = volume
        self.mountdir = Path(mountdir)
        self.name = name
        self.read_only = read_only or volume.read_only
        self.direct_io = direct_io
        self.threads = threads
        self.errors = 0  # requests answered with an error from the engine
        self._fds: list[int] = []
        self._workers: list[threading.Thread] = []
        self._mounted = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._start_ns = time.time_ns()
        self._name_b = name.encode()

    @property
    def path(self) -> Path:
        """The file presenting the volume."""
        return self.mountdir / self.name

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._workers)

    # ---------------------------------------------------------------- life cycle

    def start(self, timeout: float = 10.0) -> None:
        """Mount and serve; returns when `path` is usable. StackError on failure."""
        if self._workers:
            raise StackError("this FUSE server was started already")
        try:
            if _is_mounted(self.mountdir):
                raise StackError(f"{self.mountdir} is already a mount point",
                                 hint="a stale mount from a crashed session? run "
                                 "`dmrecover cleanup`")
            try:
                self.mountdir.mkdir(parents=True, exist_ok=True)
                os.stat(self.mountdir)
                fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            except OSError as err:
                raise StackError(f"cannot use {self.mountdir} as the FUSE mount point: "
                                 f"{err.strerror}",
                                 hint="a stale mount from a crashed session? run "
                                 "`dmrecover cleanup`") from err
            self._fds.append(fd)
            mount_fuse(fd, str(self.mountdir), fsname="dmrecover", subtype="dmrecover",
                       read_only=self.read_only)
            self._mounted = True
            for _ in range(self.threads - 1):
                clone = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
                self._fds.append(clone)
                fcntl.ioctl(clone, fp.DEV_IOC_CLONE, struct.pack("I", fd))
            for i, f in enumerate(self._fds):
                t = threading.Thread(target=self._serve, args=(f,), daemon=True,
                                     name=f"dmrecover-fuse-{i}")
                self._workers.append(t)
                t.start()
            # The kernel sends INIT first, and holds every other request until it is answered.
            if not self._ready.wait(timeout) or self._error is not None:
                raise StackError(f"FUSE server on {self.mountdir} did not start: "
                                 f"{self._error or 'no INIT from the kernel'}")
            os.stat(self.path)  # served by the pool: proves it answers
        except OSError as err:
            self._teardown()
            raise StackError(f"cannot serve FUSE on {self.mountdir}: {err}") from err
        except BaseException:
            self._teardown()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and unmount. Idempotent. StackError when the mount stays busy."""
        if not self._fds:
            return
        attached = _loops_on(self.path)
        if attached:
            raise StackError(f"{self.path} is still attached to {', '.join(attached)}",
                             hint="detach the loop device(s) before stopping the FUSE server")
        self._teardown(timeout)

    def _teardown(self, timeout: float = 30.0) -> None:
        try:
            # Unmounting ends the connection: each thread's read of /dev/fuse fails with
            # ENODEV and the thread returns. Never unmount a mount this server did not make.
            if self._mounted:
                fuse_unmount(os.path.realpath(self.mountdir))
            self._mounted = False
            deadline = time.monotonic() + timeout
            for t in self._workers:
                t.join(max(0.0, deadline - time.monotonic()))
            stuck = [t.name for t in self._workers if t.is_alive()]
            if stuck:  # in an engine call still; their descriptors stay theirs
                log.warning("FUSE threads still busy after unmounting: %s", ", ".join(stuck))
            else:
                for f in self._fds:
                    os.close(f)
        finally:
            self._fds = []
            self._workers = []

    def __enter__(self) -> FuseServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- serving

    def _serve(self, fd: int) -> None:
        buf = bytearray(MAX_WRITE + fp.READ_SLACK)
        view = memoryview(buf)
        while True:
            try:
                n = os.readv(fd, [buf])
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # ENOENT: a request interrupted before it was read
                if err.errno != errno.ENODEV:  # ENODEV: unmounted, the connection is over
                    log.error("reading /dev/fuse failed: %s", err)
                    self._error = err
                    self._ready.set()
                return
            # After DESTROY the connection ends: the next read fails with ENODEV (above).
            reply = self.answer(view, n)
            if reply is not None:
                self._send(fd, reply)

    def answer(self, request: memoryview | bytes, n: int) -> list[bytes] | None:
        """The reply to one request of `n` bytes read from /dev/fuse, as the buffers to write
        back (header, payload); None for a request that takes no reply (FORGET, INTERRUPT).
        An engine error is the reply's errno; nothing raises out of here."""
        _, op, unique, node, *_ = fp.IN_HEADER.unpack_from(request)
        if op in fp.NO_REPLY:
            return None
        try:
            out = self._dispatch(op, node, memoryview(request), n)
            err = 0
        except OSError as e:
            out, err = b"", e.errno or errno.EIO
        except Exception as e:  # noqa: BLE001 - a serving thread must go on serving
            out, err = b"", errno.EIO
            if not isinstance(e, DmrecoverError):
                log.exception("unexpected error in a FUSE request (opcode %d)", op)
        if op == fp.INIT:  # start() waits for it
            if err:
                self._error = OSError(err, f"the kernel's INIT was refused: {os.strerror(err)}")
            self._ready.set()
        return [fp.OUT_HEADER.pack(fp.OUT_HEADER.size + len(out), -err, unique), out]

    @staticmethod
    def _send(fd: int, reply: list[bytes]) -> None:
        try:
            os.writev(fd, reply)
        except OSError as e:
            # ENOENT: the request was interrupted meanwhile; ENODEV: the connection ended.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("answering a FUSE request failed: %s", e)

    def _dispatch(self, op: int, node: int, view: memoryview, n: int) -> bytes:
        base = fp.IN_HEADER.size
        if op == fp.READ:
            _, off, size, *_ = fp.RW_IN.unpack_from(view, base)
            return self._engine("read", self.volume.read, off, size)
        if op == fp.WRITE:
            _, off, size, *_ = fp.RW_IN.unpack_from(view, base)
            if self.read_only:
                raise OSError(errno.EROFS, "read-only")
            start = base + fp.RW_IN.size
            data = bytes(view[start:start + size])
            done = self._engine("write", self.volume.write, off, data)
            return fp.WRITE_OUT.pack(done, 0)
        if op in (fp.FSYNC, fp.FLUSH):
            if op == fp.FSYNC or not self.read_only:
                self._engine("flush", self.volume.flush)
            return b""
        if op == fp.LOOKUP:
            name = bytes(view[base:n]).split(b"\0", 1)[0]
            if node != fp.ROOT_ID or name != self._name_b:
                raise OSError(errno.ENOENT, "no such file")
            return fp.ENTRY_OUT.pack(_FILE_ID, 0, _TIMEOUT, _TIMEOUT, 0, 0) + \
                self._attr(_FILE_ID)
        if op == fp.GETATTR:
            return fp.ATTR_OUT.pack(_TIMEOUT, 0, 0) + self._attr(node)
        if op == fp.SETATTR:
            return self._setattr(node, view, base)
        if op == fp.OPEN:
            flags = struct.unpack_from("<I", view, base)[0]
            if node != _FILE_ID:
                raise OSError(errno.EISDIR, "a directory")
            if self.read_only and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EROFS, "read-only")
            if flags & os.O_TRUNC:
                raise OSError(errno.EPERM, "the volume's size is fixed")
            return fp.OPEN_OUT.pack(node, fp.FOPEN_DIRECT_IO if self.direct_io else 0, 0)
        if op == fp.OPENDIR:
            if node != fp.ROOT_ID:
                raise OSError(errno.ENOTDIR, "not a directory")
            return fp.OPEN_OUT.pack(node, 0, 0)
        if op == fp.READDIR:
            _, off, size, *_ = fp.RW_IN.unpack_from(view, base)
            if off > 0:
                return b""
            return fp.dirent(_FILE_ID, 1, self._name_b, stat.S_IFREG >> 12)[:size]
        if op in (fp.RELEASE, fp.RELEASEDIR, fp.FSYNCDIR, fp.ACCESS, fp.DESTROY):
            return b""
        if op == fp.STATFS:
            blocks = (self.volume.size + 4095) // 4096
            return fp.KSTATFS.pack(blocks, 0, 0, 2, 0, 4096, 255, 4096)
        if op == fp.INIT:
            return self._init(view, base)
        raise OSError(errno.ENOSYS, "not implemented")

    def _engine(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the engine; its errors become the errno the request is answered with."""
        try:
            return fn(*args)
        except Exception as err:
            self.errors += 1
            log.error("%s failed: %s", what, err)
            if isinstance(err, OSError) and err.errno:
                raise
            # A fetch past its deadline, a corrupt chunk, a bug: an I/O error to the reader.
            raise OSError(errno.EIO, str(err)) from err

    def _init(self, view: memoryview, base: int) -> bytes:
        major, minor, max_readahead, flags = fp.INIT_IN.unpack_from(view, base)
        if major != fp.MAJOR or minor < fp.MINOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is too old")
        want = flags & (fp.ASYNC_READ | fp.BIG_WRITES | fp.MAX_PAGES)
        # max_background: how many asynchronous requests (the direct-I/O loop's) the kernel
        # keeps in flight; above the pool, so the pool is never idle while the loop waits.
        return fp.INIT_OUT.pack(fp.MAJOR, fp.MINOR, max_readahead, want,
                                2 * self.threads, 2 * self.threads, MAX_WRITE, 1,
                                MAX_WRITE // 4096, 0, 0, 0)

    def _attr(self, node: int) -> bytes:
        s = self._start_ns // 1_000_000_000
        ns = self._start_ns % 1_000_000_000
        if node == fp.ROOT_ID:
            mode, nlink, size = stat.S_IFDIR | 0o755, 2, 0
        elif node == _FILE_ID:
            mode = stat.S_IFREG | (0o400 if self.read_only else 0o600)
            nlink, size = 1, self.volume.size
        else:
            raise OSError(errno.ENOENT, "no such node")
        return fp.ATTR.pack(node, size, (size + 511) // 512, s, s, s, ns, ns, ns, mode, nlink,
                            os.getuid(), os.getgid(), 0, 4096, 0)

    def _setattr(self, node: int, view: memoryview, base: int) -> bytes:
        # The volume's size is fixed; accept a no-op truncate and time updates only.
        valid, _, _, size, *_ = fp.SETATTR_IN.unpack_from(view, base)
        if valid & fp.FATTR_SIZE and (node != _FILE_ID or size != self.volume.size):
            raise OSError(errno.EPERM, "the volume's size is fixed")
        if valid & (fp.FATTR_MODE | fp.FATTR_UID | fp.FATTR_GID):
            raise OSError(errno.EPERM, "modes and owners are fixed")
        return fp.ATTR_OUT.pack(_TIMEOUT, 0, 0) + self._attr(node)


def _loops_on(path: Path) -> list[str]:
    """Loop devices backed by the file at path (read from sysfs: the FUSE file itself is not
    touched, so this works even when its server is gone)."""
    return [dev for dev, _ in loops.loops_backed_under(os.path.realpath(path))]


def _is_mounted(path: Path) -> bool:
    return is_mountpoint(os.path.realpath(path))
