"""Where repository objects live: the `Storage` interface and the local-directory store.

Keys are '/'-separated relative paths. An HTTP-range or S3 store only has to implement the six
methods of `Storage`; `LocalStorage` is a directory on a local or mounted (NFS, CIFS)
filesystem, its objects written with the one durable write (`system.files.atomic_write`).
"""

from __future__ import annotations

import os
import stat
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from dmrecover.errors import RepositoryError, RepositoryUnavailable
from dmrecover.system.files import atomic_write, fsync_dir, unlink_quietly

# Every object and folder the repository writes is private to its owner.
FILE_MODE = 0o600
DIR_MODE = 0o700


class BadObject(Exception):
    """A stored object that cannot be what the repository wrote (not a regular file...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Storage(ABC):
    """Where repository objects live. Keys are relative '/'-separated paths.

    `get` raises FileNotFoundError when the object does not exist (and the storage itself is
    reachable), RepositoryUnavailable or another OSError when the storage cannot be reached.
    """

    #: Fetches that run at once by default: a local store is bound by the CPU (decompress,
    #: hash), a network store by latency, where more requests in flight pay.
    fetch_concurrency: int | None = None  # None: one per core, plus one

    @abstractmethod
    def get(self, key: str, max_size: int | None = None) -> bytes:
        """The object's bytes. With max_size, at most max_size + 1 bytes are read (so the
        caller can tell an oversized object without reading all of it); BadObject when the
        object cannot be one the repository wrote."""

    @abstractmethod
    def put_atomic(self, key: str, data: bytes, *, sync_dir: bool = True) -> None:
        """Store data under key: whole or not at all, durable before this returns.

        With sync_dir=False the directory entry may not be durable yet; call `sync()` before
        writing anything that points to the object.
        """

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys directly under the directory `prefix` (names only)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def sync(self) -> None:
        """Make every put_atomic(sync_dir=False) so far durable."""


class LocalStorage(Storage):
    """A directory on a local or mounted (NFS, CIFS) filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._pending_dirs: set[Path] = set()
        self._pending_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / key

    def _open_object(self, key: str) -> int:
        # O_NONBLOCK: a FIFO planted in place of an object must not hang the open.
        return os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def _check_reachable(self) -> None:
        # A vanished repository root (unmounted share, ...) is not a missing object.
        if not (self.root / "config.json").exists():
            raise RepositoryUnavailable(
                f"repository {self.root} is not reachable (config.json is gone)",
                hint="check that the repository's filesystem or share is mounted",
            ) from None

    def get(self, key: str, max_size: int | None = None) -> bytes:
        try:
            fd = self._open_object(key)
        except FileNotFoundError:
            self._check_reachable()
            # The repository may have come back between the failed open and the check (its
            # share remounted): the object counts as missing only when it is still missing
            # with the repository reachable. Without this second open, the end of an outage
            # turned a waiting read into "chunk missing" (CorruptChunk: an I/O error, and an
            # invalidated dm-snapshot when the read was the kernel's copy-on-write).
            try:
                fd = self._open_object(key)
            except FileNotFoundError:
                self._check_reachable()
                raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadObject("not a regular file")
            if max_size is None:
                max_size = st.st_size
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(max_size + 1)
        finally:
            os.close(fd)

    def put_atomic(self, key: str, data: bytes, *, sync_dir: bool = True) -> None:
        target = self._path(key)
        if not target.parent.is_dir():
            # A new key directory: make its own name durable before any object in it.
            target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fsync_dir(target.parent.parent)
        # Temp files in REPO/tmp, never in chunks/ or backups/: a crash leaves no stray name
        # that a listing would take for an object.
        atomic_write(target, data, mode=FILE_MODE, sync_dir=sync_dir, tmp_dir=self.root / "tmp")
        if not sync_dir:
            with self._pending_lock:
                self._pending_dirs.add(target.parent)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except FileNotFoundError:
            return []

    def delete(self, key: str) -> None:
        unlink_quietly(self._path(key))

    def sync(self) -> None:
        with self._pending_lock:
            dirs, self._pending_dirs = self._pending_dirs, set()
        for d in sorted(dirs):
            fsync_dir(d)


    # -- where the repository is (by device and inode: a symlink, hard link or bind mount
    # -- names the same objects under another path)

    def _dirs(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of the root and every folder in it (some 260: cheap)."""
        out: set[tuple[int, int]] = set()
        todo = [str(self.root)]
        while todo:
            d = todo.pop()
            try:
                st = os.stat(d)
                out.add((st.st_dev, st.st_ino))
                with os.scandir(d) as it:
                    todo.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
        return out

    def _holds_inode(self, dev: int, ino: int) -> bool:
        """True when a file of the repository has this identity (readdir's inode numbers: no
        stat per chunk)."""
        todo = [str(self.root)]
        while todo:
            d = todo.pop()
            try:
                if os.stat(d).st_dev != dev:
                    continue
                with os.scandir(d) as it:
                    for e in it:
                        if e.inode() == ino:
                            return True
                        if e.is_dir(follow_symlinks=False):
                            todo.append(e.path)
            except OSError:
                continue
        return False

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """True when path is the repository, lies inside it, or is one of its files, under
        whatever name: symlinks are followed (also a dangling one: what it would create),
        bind mounts and hard links are recognised by device and inode."""
        dirs = self._dirs()
        p = os.path.realpath(path)
        while True:
            try:
                st = os.stat(p)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) in dirs:
                    return True
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        try:
            st = os.stat(path)
        except OSError:
            return False
        # An existing file elsewhere may still be a repository file (hard link, bind mount).
        return (stat.S_ISREG(st.st_mode) and st.st_dev in {dev for dev, _ in dirs}
                and self._holds_inode(st.st_dev, st.st_ino))

    def is_within(self, path: str | os.PathLike[str]) -> bool:
        """True when the repository lies inside the folder path (or is it), or on the block
        device path (the device of its filesystem, a device under it, or its whole disk)."""
        try:
            st = os.stat(path)
            root = os.stat(self.root)
        except OSError:
            return False
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev in _devices_under(root.st_dev)
        if not stat.S_ISDIR(st.st_mode):
            return False
        here, cur = str(self.root), root
        for _ in range(4096):
            if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                return True
            here = os.path.join(here, "..")
            try:
                up = os.stat(here)
            except OSError:
                return False
            if (up.st_dev, up.st_ino) == (cur.st_dev, cur.st_ino):
                return False  # the top: / is its own parent
            cur = up
        return False

    # -- trust

    def check_trusted(self) -> None:
        """As root, refuse a repository another user could have written (RepositoryError with
        a chown/chmod hint): its folders, config, lock and manifests, and the folders above
        it, must be root's and not group- or world-writable. Other users use their own
        repositories unchecked (the kernel keeps them to what they may write)."""
        if os.geteuid() != 0:
            return
        check_trusted_path(self.root)
        names = [str(self.root)]
        for sub in ("config.json", "lock", "chunks", "backups", "tmp"):
            names.append(os.path.join(self.root, sub))
        for sub in ("chunks", "backups"):
            try:
                with os.scandir(self.root / sub) as it:
                    names.extend(e.path for e in it)
            except OSError:
                pass
        for name in names:
            _check_one(name, self.root, sticky_ok=False)


def path_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when path is folder or lies inside it: by device and inode where both exist (a
    symlink or bind mount does not hide it), by real path where they do not exist yet."""
    try:
        f = os.stat(folder)
    except OSError:
        f = None
    real_folder = os.path.realpath(folder)
    p = os.path.realpath(path)
    while True:
        if p == real_folder:
            return True
        if f is not None:
            try:
                st = os.stat(p)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) == (f.st_dev, f.st_ino):
                    return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def check_trusted_path(path: str | os.PathLike[str]) -> None:
    """As root, refuse when a folder above path (under the given name or its real one) is
    another user's or writable by others without the sticky bit: they could swap path."""
    if os.geteuid() != 0:
        return
    seen: set[str] = set()
    for start in (os.path.abspath(path), os.path.realpath(path)):
        p = os.path.dirname(start)
        while p not in seen:
            seen.add(p)
            _check_one(p, Path(path), sticky_ok=True)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent


def _check_one(name: str, repo: Path, *, sticky_ok: bool) -> None:
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return
    except OSError as err:
        raise RepositoryError(f"cannot check repository {repo}: {name}: {err.strerror}") \
            from err
    if st.st_uid != 0:
        raise RepositoryError(
            f"repository {repo} could have been written by another user: {name} is owned by "
            f"uid {st.st_uid}",
            hint=f"if you trust its content: chown -R root:root {name}")
    writable = st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)
    if writable and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise RepositoryError(
            f"repository {repo} could have been written by another user: {name} is group- or "
            "world-writable",
            hint=f"if you trust its content: chmod go-w {name}")


def _devices_under(dev: int) -> set[int]:
    """The block device of a filesystem, every device it is built on (dm, md slaves), and the
    whole disk of each partition among them (sysfs)."""
    out: set[int] = set()
    todo = [dev]
    while todo:
        d = todo.pop()
        if d in out:
            continue
        out.add(d)
        base = Path(f"/sys/dev/block/{os.major(d)}:{os.minor(d)}")
        try:
            for slave in (base / "slaves").iterdir():
                todo.append(_devnum_of(slave / "dev"))
        except (OSError, ValueError):
            pass
        try:
            if (base / "partition").exists():
                todo.append(_devnum_of(base.resolve().parent / "dev"))
        except (OSError, ValueError):
            pass
    return out


def _devnum_of(sysfs_dev: Path) -> int:
    major, minor = sysfs_dev.read_text().strip().split(":")
    return os.makedev(int(major), int(minor))
