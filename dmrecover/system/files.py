"""Durable files: the one atomic write, the one directory fsync.

Every file dmrecover must find whole after a crash (session records, bitmaps, markers,
repository objects and manifests) is written by `atomic_write`: a temp file in the target's
directory (or a given temp directory on the same filesystem), every byte written, fdatasync,
rename over the target, fsync of the directory. A crash leaves the old file or the new one,
never a torn one. Written once here, as borg's SaveFile and sync_dir, instead of one copy per
module.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dmrecover.errors import DmrecoverError

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
        _unlink_quietly(tmp)
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


def _unlink_quietly(path: StrPath) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
