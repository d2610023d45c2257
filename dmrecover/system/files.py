"""Durable files: the one atomic write, the one directory fsync.

Every file dmrecover must find whole after a crash (session records, bitmaps, markers,
repository objects and manifests) is written by `atomic_write`: a temp file in the target's
directory (or a given temp directory on the same filesystem), every byte written, fdatasync,
rename over the target, fsync of the directory. A crash leaves the old file or the new one,
never a torn one. Written once here, as borg's SaveFile and sync_dir, instead of one copy per
module.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dmrecover.errors import DmrecoverError
from dmrecover.system import libc

Buffer = bytes | bytearray | memoryview
StrPath = str | os.PathLike[str]

# O_NOFOLLOW|O_EXCL: a symlink or file planted at the temp name is never written through.
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_all(fd: int, data: Buffer, offset: int | None = None) -> None:
    """Write every byte of data to fd (os.write may write less than asked).

    With offset, pwrite at that offset (the file position is left alone).
    """
    view = memoryview(data).cast("B")
    while view:
        if offset is None:
            n = os.write(fd, view)
        else:
            n = os.pwrite(fd, view, offset)
            offset += n
        view = view[n:]


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back [offset, offset+length) of fd (sync_file_range WRITE: returns
    without waiting for the disk; no durability), so dirty data goes out as it is written
    instead of in one burst at the next fsync. Errors are ignored (the fsync reports them),
    and so is a C library without sync_file_range."""
    fn = libc.function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_uint)
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: StrPath) -> None:
    """fsync a directory so the names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: StrPath,
    data: Buffer | Iterable[Buffer],
    *,
    mode: int = 0o600,
    durable: bool = True,
    sync_dir: bool | None = None,
    tmp_dir: StrPath | None = None,
) -> None:
    """Replace path with data, whole or not at all.

    data is one buffer or several written back to back (a header and a large body need no
    concatenated copy). durable=False skips the fsyncs (atomic but not crash-safe: for files
    rewritten often whose loss is harmless). sync_dir=False (default: durable) defers the
    directory fsync to the caller, who batches it with `fsync_dir` before anything points to
    the file. tmp_dir keeps temp files out of the target's directory (same filesystem).
    """
    target = Path(path)
    where = Path(tmp_dir) if tmp_dir is not None else target.parent
    tmp = where / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    parts: Iterable[Buffer] = (data,) if isinstance(data, bytes | bytearray | memoryview) \
        else data
    fd = os.open(tmp, _TEMP_FLAGS, mode)
    try:
        try:
            for part in parts:
                write_all(fd, part)
            if durable:
                # fdatasync covers the data and the size of a new file, all a reader needs.
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if durable if sync_dir is None else sync_dir:
        fsync_dir(target.parent)


def write_json_atomic(path: StrPath, obj: Any, *, durable: bool = True,
                      mode: int = 0o600) -> None:
    """Write obj as JSON (indented, sorted keys, trailing newline) with `atomic_write`."""
    data = json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"
    atomic_write(path, data, mode=mode, durable=durable)


def read_json(path: StrPath, *,
              error: type[DmrecoverError] = DmrecoverError) -> dict | None:
    """The JSON object in path, None when the file does not exist.

    An unreadable file or one that does not hold a JSON object raises `error` (the caller's
    own error type, e.g. SessionError).
    """
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        raise error(f"{path} is unreadable: {err}") from err
    if not isinstance(obj, dict):
        raise error(f"{path} is unreadable: not a JSON object")
    return obj


# ---------------------------------------------------------------- private by default


def check_trusted(path: StrPath, *, kind: str = "file", error: type[DmrecoverError]
                  = DmrecoverError) -> os.stat_result:
    """Refuse (error) a path that another user could have written: not owned by root (or
    this user), group or world writable, or a symbolic link. Returns its lstat."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{kind} {path} is a symbolic link",
                    hint="dmrecover never follows one it did not make; name the real path")
    if st.st_uid not in (0, os.geteuid()):
        raise error(f"{kind} {path} is owned by uid {st.st_uid}, not by root",
                    hint="another user could change what dmrecover does as root; "
                         "use a directory of your own")
    if st.st_mode & 0o022:
        raise error(f"{kind} {path} is writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):o})",
                    hint=f"chmod go-w {path}, or use another")
    return st


def private_dir(path: StrPath, *, error: type[DmrecoverError] = DmrecoverError,
                kind: str = "directory") -> None:
    """Create path as a directory 0700 (and missing parents 0700), or check an existing one
    with `check_trusted`. An existing directory that is readable by others is left as it is
    (the operator's choice) but nothing in it is trusted unless `check_trusted` passes."""
    p = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(p, mode=0o700)
        os.chmod(p, 0o700)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        pass
    st = check_trusted(p, kind=kind, error=error)
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{kind} {p} is not a directory")
    # Open it without following a link planted since the check: a last check of identity.
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st2 = os.fstat(fd)
    finally:
        os.close(fd)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        raise error(f"{kind} {p} changed while it was checked", hint="try again")


def read_trusted_json(path: StrPath, *, error: type[DmrecoverError] = DmrecoverError
                      ) -> dict | None:
    """As `read_json`, but only from a regular file of root (or this user) no one else can
    write (opened with O_NOFOLLOW); None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise error(f"{path} is unreadable: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) \
                or st.st_mode & 0o022:
            raise error(f"{path} is not trusted: owned by uid {st.st_uid}, mode "
                        f"{stat.S_IMODE(st.st_mode):o}",
                        hint="it must be owned by root and writable by it only; another "
                             "user may have changed it")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise error(f"{path} is unreadable: {err}") from err
    if not isinstance(obj, dict):
        raise error(f"{path} is unreadable: not a JSON object")
    return obj


def unlink_quietly(path: StrPath) -> None:
    """Remove a file; one already gone is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
