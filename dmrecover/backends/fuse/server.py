"""Presents a PseudoVolume as one file on a FUSE mount (pyfuse3, trio).

The mount directory holds a single regular file (default name `volume`) the size of the
volume; `losetup` attaches it and the filesystem is mounted from the loop device. Every request
runs the blocking engine call in a worker thread (trio.to_thread.run_sync) so that many run at
once (an on-demand fetch does not stall reads of restored data). fsync and flush map to
`PseudoVolume.flush()`: when the loop device forwards a flush, it returns once the writes are
durable.

pyfuse3 keeps one FUSE session per process, so one FuseServer runs per process at a time (a
session presents one pseudo-volume).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.errors import DmrecoverError, StackError
from dmrecover.system import command, loops
from dmrecover.system.mounts import is_mountpoint

log = logging.getLogger(__name__)

_FILE_INODE = pyfuse3.ROOT_INODE + 1
_session_lock = threading.Lock()  # pyfuse3 is one session per process


def _to_fuse_error(err: BaseException) -> pyfuse3.FUSEError:
    """OSErrors keep their errno; everything else (a fetch past its deadline, a corrupt chunk,
    a bug) is EIO: an exception escaping a handler would end the whole FUSE loop."""
    if isinstance(err, OSError) and err.errno:
        return pyfuse3.FUSEError(err.errno)
    if not isinstance(err, DmrecoverError):
        log.exception("unexpected error in a FUSE request", exc_info=err)
    return pyfuse3.FUSEError(errno.EIO)


class VolumeOperations(pyfuse3.Operations):
    """FUSE operations for a directory holding one file backed by a PseudoVolume."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, volume: PseudoVolume, name: str, *, read_only: bool,
                 direct_io: bool) -> None:
        super().__init__()
        self.volume = volume
        self.name = name.encode()
        self.read_only = read_only or volume.read_only
        self.direct_io = direct_io
        self.errors = 0
        self._start = time.time_ns()

    # ---------------------------------------------------------------- attributes

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif inode == _FILE_INODE:
            a.st_mode = stat.S_IFREG | (0o400 if self.read_only else 0o600)
            a.st_nlink = 1
            a.st_size = self.volume.size
            a.st_blocks = (self.volume.size + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blksize = 4096
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._start
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return self._attr(_FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        # The volume's size is fixed; accept a no-op truncate and time updates only.
        if fields.update_size and (inode != _FILE_INODE or attr.st_size != self.volume.size):
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.volume.size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = 2
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # ---------------------------------------------------------------- directory

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(_FILE_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        pass

    # ---------------------------------------------------------------- file

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != _FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # Fast path, on the trio loop itself: restored or overlay data that the page cache
        # holds (read_nowait never waits for a disk: a cold DEST read cannot stall the other
        # requests). The hand-off to a worker thread was the largest stage of a cached 4 KiB
        # read (docs/architecture.md, Performance). Everything else: a worker thread.
        try:
            data = self.volume.read_nowait(off, size)
        except Exception:  # noqa: BLE001 - the blocking read below reports any error
            data = None
        if data is not None:
            return data
        try:
            return await trio.to_thread.run_sync(self.volume.read, off, size)
        except Exception as err:  # noqa: BLE001 - any escape would end pyfuse3.main
            self.errors += 1
            log.error("read of %d bytes at %d failed: %s", size, off, err)
            raise _to_fuse_error(err) from err

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            return await trio.to_thread.run_sync(self.volume.write, off, buf)
        except Exception as err:  # noqa: BLE001 - any escape would end pyfuse3.main
            self.errors += 1
            log.error("write of %d bytes at %d failed: %s", len(buf), off, err)
            raise _to_fuse_error(err) from err

    async def _flush(self) -> None:
        try:
            await trio.to_thread.run_sync(self.volume.flush)
        except Exception as err:  # noqa: BLE001 - any escape would end pyfuse3.main
            self.errors += 1
            log.error("flush failed: %s", err)
            raise _to_fuse_error(err) from err

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush()

    async def flush(self, fh: int) -> None:
        if not self.read_only:
            await self._flush()

    async def release(self, fh: int) -> None:
        pass


class FuseServer:
    """Serve `volume` as `mountdir/name` from a thread of this process.

    start() mounts and returns once the file answers; stop() unmounts (the loop device on the
    file must be detached first). direct_io (default True) bypasses the page cache of the FUSE
    file, so the loop device above does not cache everything twice.
    """

    def __init__(self, volume: PseudoVolume, mountdir: str | os.PathLike[str], *,
                 name: str = "volume", read_only: bool = False, direct_io: bool = True,
                 max_tasks: int = 32) -> None:
        self.volume = volume
        self.mountdir = Path(mountdir)
        self.name = name
        self.read_only = read_only or volume.read_only
        self.ops = VolumeOperations(volume, name, read_only=self.read_only, direct_io=direct_io)
        self.max_tasks = max_tasks
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._owns_session = False
        self._initialized = False

    @property
    def path(self) -> Path:
        """The file presenting the volume."""
        return self.mountdir / self.name

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        """Mount and serve; returns when `path` is usable. StackError on failure."""
        if not _session_lock.acquire(blocking=False):
            raise StackError("a FUSE server already runs in this process",
                             hint="one pseudo-volume per session process")
        self._owns_session = True
        try:
            if _is_mounted(self.mountdir):
                raise StackError(f"{self.mountdir} is already a mount point",
                                 hint="a stale mount from a crashed session? run "
                                 "`dmrecover cleanup`")
            try:
                self.mountdir.mkdir(parents=True, exist_ok=True)
                os.stat(self.mountdir)
            except OSError as err:
                raise StackError(f"cannot use {self.mountdir} as the FUSE mount point: "
                                 f"{err.strerror}",
                                 hint="a stale mount from a crashed session? run "
                                 "`dmrecover cleanup`") from err
            options = set(pyfuse3.default_options)
            options |= {"fsname=dmrecover", "subtype=dmrecover"}
            if self.read_only:
                options.add("ro")
            try:
                pyfuse3.init(self.ops, str(self.mountdir), options)
                self._initialized = True
            except Exception as err:
                raise StackError(f"cannot mount FUSE on {self.mountdir}: {err}",
                                 hint="is /dev/fuse there and the directory not in use?") \
                    from err
            self._thread = threading.Thread(target=self._serve, name="dmrecover-fuse",
                                            daemon=True)
            self._thread.start()
            if not self._ready.wait(timeout) or self._error is not None:
                raise StackError(f"FUSE server on {self.mountdir} did not start: "
                                 f"{self._error or 'timeout'}")
            os.stat(self.path)  # served by the loop: proves it answers
        except BaseException:
            self._teardown()
            raise

    def _serve(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await pyfuse3.main(min_tasks=2, max_tasks=self.max_tasks)

        try:
            trio.run(main)
        except BaseException as err:  # reported by start() or stop()
            log.error("FUSE loop ended with an error: %s", err)
            self._error = err
            self._ready.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and unmount. Idempotent. StackError when the mount stays busy."""
        if not self._owns_session:
            return
        attached = _loops_on(self.path)
        if attached:
            raise StackError(f"{self.path} is still attached to {', '.join(attached)}",
                             hint="detach the loop device(s) before stopping the FUSE server")
        self._teardown(timeout)

    def _teardown(self, timeout: float = 30.0) -> None:
        ours = self._initialized  # never unmount a mount this server did not make
        try:
            if self._thread is not None and self._thread.is_alive() and self._token is not None:
                try:
                    trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
                except trio.RunFinishedError:
                    pass
                self._thread.join(timeout)
            if self._initialized:  # pyfuse3.close() without init() crashes the process
                self._initialized = False
                try:
                    pyfuse3.close(unmount=True)
                except Exception as err:  # fall back to fusermount3 below
                    log.warning("pyfuse3.close: %s", err)
            if ours and _is_mounted(self.mountdir):
                command.run(["fusermount3", "-u", str(self.mountdir)], error=StackError,
                            what=f"unmounting FUSE {self.mountdir}")
        finally:
            self._thread = None
            self._token = None
            if self._owns_session:
                self._owns_session = False
                _session_lock.release()

    def __enter__(self) -> FuseServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _loops_on(path: Path) -> list[str]:
    """Loop devices backed by the file at path (read from sysfs: the FUSE file itself is not
    touched, so this works even when its server is gone)."""
    return [dev for dev, _ in loops.loops_backed_under(os.path.realpath(path))]


def _is_mounted(path: Path) -> bool:
    return is_mountpoint(os.path.realpath(path))
