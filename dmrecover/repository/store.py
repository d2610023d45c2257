"""Where repository objects live: the `Storage` interface and the local-directory store.

Keys are '/'-separated relative paths. An HTTP-range or S3 store only has to implement the six
methods of `Storage`; `LocalStorage` is a directory on a local or mounted (NFS, CIFS)
filesystem, its objects written with the one durable write (`system.files.atomic_write`).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from dmrecover.errors import RepositoryUnavailable
from dmrecover.system.files import atomic_write, fsync_dir


class Storage(ABC):
    """Where repository objects live. Keys are relative '/'-separated paths.

    `get` raises FileNotFoundError when the object does not exist (and the storage itself is
    reachable), RepositoryUnavailable or another OSError when the storage cannot be reached.
    """

    @abstractmethod
    def get(self, key: str) -> bytes: ...

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

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            # A vanished repository root (unmounted share, ...) is not a missing object.
            if not (self.root / "config.json").exists():
                raise RepositoryUnavailable(
                    f"repository {self.root} is not reachable (config.json is gone)",
                    hint="check that the repository's filesystem or share is mounted",
                ) from None
            raise

    def put_atomic(self, key: str, data: bytes, *, sync_dir: bool = True) -> None:
        target = self._path(key)
        if not target.parent.is_dir():
            # A new key directory: make its own name durable before any object in it.
            target.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(target.parent.parent)
        # Temp files in REPO/tmp, never in chunks/ or backups/: a crash leaves no stray name
        # that a listing would take for an object.
        atomic_write(target, data, mode=0o644, sync_dir=sync_dir, tmp_dir=self.root / "tmp")
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
        _unlink_quietly(self._path(key))

    def sync(self) -> None:
        with self._pending_lock:
            dirs, self._pending_dirs = self._pending_dirs, set()
        for d in sorted(dirs):
            fsync_dir(d)


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
