"""The backup repository: format, chunks, the writer lock, `read_chunk()`.

Format (version 1, see docs/architecture.md)::

    REPO/config.json        {"format": "dmrecover-repo", "version": 1, "hash": "blake3", ...}
    REPO/chunks/ab/<digest> zstd frame of the chunk; digest = blake3 hex of the plain bytes
    REPO/backups/<id>.json  manifest
    REPO/lock               flock()ed by writers
    REPO/tmp/               temp files, renamed into place after fsync

All storage access goes through `store.Storage` (keys are '/'-separated relative paths), so an
HTTP-range or S3 store only has to implement its methods; manifests and digests are in
`manifest.py`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard

from dmrecover.errors import (
    BackupNotFound,
    CorruptChunk,
    RepositoryError,
    RepositoryLocked,
    RepositoryUnavailable,
)
from dmrecover.repository.manifest import HASH, Manifest, chunk_key, digest_of
from dmrecover.repository.store import LocalStorage, Storage
from dmrecover.system.files import fsync_dir

log = logging.getLogger(__name__)

FORMAT = "dmrecover-repo"
VERSION = 1
COMPRESSION = "zstd"
ZSTD_LEVEL = 3

# errnos that mean "the storage cannot be reached right now"; every other OSError on a read is
# treated the same way (transient), except ENOENT of a named chunk, which means it is missing.
_TRANSIENT = {errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN,
              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET, errno.ECONNREFUSED}


class _Bad(Exception):
    """Internal: a chunk is missing or corrupt (reason in `reason`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Repository:
    """A backup repository. Readers need no lock; writers hold `lock()`."""

    def __init__(self, path: str | os.PathLike[str], storage: Storage | None = None) -> None:
        self.path = Path(path)
        self.storage = storage or LocalStorage(self.path)
        self.config: dict = {}
        self._local = threading.local()

    # -- creating and opening

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> Repository:
        """Create an empty repository at path (which must not exist or be an empty directory)."""
        p = Path(path)
        if p.exists():
            if not p.is_dir():
                raise RepositoryError(f"cannot create repository {p}: it exists and is not a "
                                      "directory", hint="choose a new path")
            if any(p.iterdir()):
                raise RepositoryError(f"cannot create repository {p}: directory is not empty",
                                      hint="choose a new or empty directory")
        elif not p.parent.is_dir():
            raise RepositoryError(f"cannot create repository {p}: {p.parent} does not exist",
                                  hint="create the parent directory first")
        try:
            p.mkdir(exist_ok=True)
            for sub in ("chunks", "backups", "tmp"):
                (p / sub).mkdir()
            for i in range(256):
                (p / "chunks" / f"{i:02x}").mkdir()
            (p / "lock").touch()
            for d in (p / "chunks", p / "backups", p / "tmp", p):
                fsync_dir(d)
            config = {"format": FORMAT, "version": VERSION, "hash": HASH,
                      "compression": COMPRESSION, "created": time.time()}
            LocalStorage(p).put_atomic("config.json",
                                       (json.dumps(config, indent=2) + "\n").encode())
        except OSError as err:
            raise RepositoryError(f"cannot create repository {p}: {err.strerror}") from err
        return cls.open(p)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Repository:
        """Open an existing repository; clear errors when it is missing or not one."""
        p = Path(path)
        if not p.exists():
            raise RepositoryError(f"repository {p} does not exist",
                                  hint=f"create it with: dmrecover repo init {p}")
        if not p.is_dir():
            raise RepositoryError(f"{p} is not a repository (not a directory)",
                                  hint="give the path of a directory made by dmrecover repo init")
        try:
            raw = (p / "config.json").read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"{p} is not a dmrecover repository (no config.json)",
                                  hint="create one with: dmrecover repo init NEWPATH") from None
        except OSError as err:
            raise RepositoryUnavailable(f"cannot read repository {p}: {err.strerror}") from err
        try:
            config = json.loads(raw)
        except ValueError:
            config = {}
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise RepositoryError(f"{p} is not a dmrecover repository (config.json is foreign)")
        if config.get("version") != VERSION or config.get("hash") != HASH:
            raise RepositoryError(f"repository {p} has unsupported format version "
                                  f"{config.get('version')} / hash {config.get('hash')}",
                                  hint="use the dmrecover version that created it")
        repo = cls(p)
        repo.config = config
        return repo

    # -- writer lock

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the writer lock; a second writer gets RepositoryLocked at once."""
        try:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RepositoryError(f"cannot open lock file of {self.path}: {err.strerror}") \
                from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RepositoryLocked(
                    f"repository {self.path} is locked by another writer (a backup is running)",
                    hint="wait for it to finish and try again",
                ) from None
            self._clean_tmp()
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _clean_tmp(self) -> None:
        """Remove temp files a killed writer left (only the lock holder writes temp files)."""
        for name in self.storage.list("tmp"):
            self.storage.delete(f"tmp/{name}")

    # -- manifests

    def load_all(self) -> tuple[list[Manifest], list[str]]:
        """All readable manifests (oldest first) and a problem line per unreadable one."""
        manifests: list[Manifest] = []
        problems: list[str] = []
        for name in self.storage.list("backups"):
            if not name.endswith(".json"):
                continue
            try:
                manifests.append(Manifest.from_json(self.storage.get(f"backups/{name}")))
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"manifest backups/{name} is unreadable: {err}")
            except FileNotFoundError:
                continue  # deleted meanwhile
            except OSError as err:
                raise RepositoryUnavailable(f"cannot read backups/{name} in {self.path}: "
                                            f"{err.strerror}") from err
        manifests.sort(key=lambda m: (m.created, m.id))
        return manifests, problems

    def backups(self) -> list[Manifest]:
        """All readable backups, oldest first (unreadable manifests are logged and skipped)."""
        manifests, problems = self.load_all()
        for p in problems:
            log.warning("%s", p)
        return manifests

    def manifest(self, ref: str) -> Manifest:
        """A backup by id, unique id prefix, or name (the latest backup with that name)."""
        manifests = self.backups()
        exact = [m for m in manifests if m.id == ref]
        if exact:
            return exact[0]
        by_prefix = [m for m in manifests if m.id.startswith(ref)] if ref else []
        if len(by_prefix) == 1:
            return by_prefix[0]
        if len(by_prefix) > 1:
            raise BackupNotFound(f"backup id prefix {ref!r} is ambiguous "
                                 f"({len(by_prefix)} backups match)",
                                 hint="give more digits of the id (dmrecover list)")
        by_name = [m for m in manifests if m.name == ref]
        if by_name:
            return by_name[-1]
        raise BackupNotFound(f"no backup {ref!r} in repository {self.path}",
                             hint=f"see the backups with: dmrecover list --repo {self.path}")

    def save_manifest(self, manifest: Manifest) -> None:
        """Write a manifest (after every chunk it names is durable)."""
        self.storage.sync()
        self.storage.put_atomic(f"backups/{manifest.id}.json", manifest.to_json())

    # -- chunks

    def has_chunk(self, digest: str) -> bool:
        return self.storage.exists(chunk_key(digest))

    def put_chunk(self, digest: str, data: bytes | memoryview, *, sync_dir: bool = False) -> int:
        """Compress and store a chunk; returns the stored size. Caller checks dedup first."""
        frame = self._compressor().compress(data)
        self.storage.put_atomic(chunk_key(digest), frame, sync_dir=sync_dir)
        return len(frame)

    def _compressor(self) -> zstandard.ZstdCompressor:
        # zstd contexts are not thread-safe: one per thread.
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def _fetch(self, digest: str, length: int, where: str) -> bytes:
        """Fetch, decompress, verify; raises _Bad(reason) or RepositoryUnavailable."""
        try:
            frame = self.storage.get(chunk_key(digest))
        except FileNotFoundError:
            raise _Bad("missing") from None
        except RepositoryUnavailable:
            raise
        except OSError as err:
            raise RepositoryUnavailable(
                f"cannot read {where} from repository {self.path}: "
                f"{err.strerror or err} (errno {err.errno})",
                hint="check the repository's storage; the read will be retried",
            ) from err
        try:
            # A damaged header could claim a huge size: refuse before allocating it.
            if zstandard.frame_content_size(frame) not in (length, -1):
                raise _Bad("corrupt (frame size does not match the chunk)")
            data = self._decompressor().decompress(frame, max_output_size=length)
        except zstandard.ZstdError as err:
            raise _Bad(f"corrupt (cannot decompress: {err})") from None
        if len(data) != length or digest_of(data) != digest:
            raise _Bad("corrupt (content does not match its digest)")
        return data

    def chunk_problem(self, digest: str, length: int) -> str | None:
        """None when the chunk is present and good, else what is wrong ("missing", ...)."""
        try:
            self._fetch(digest, length, f"chunk {digest}")
        except _Bad as bad:
            return bad.reason
        return None

    def load_chunk(self, digest: str, length: int, *, backup: str = "", index: int = -1) -> bytes:
        """Fetch, decompress and verify one chunk by digest; see `read_chunk`."""
        where = f"chunk {index} ({digest}) of backup {backup}" if backup else f"chunk {digest}"
        try:
            return self._fetch(digest, length, where)
        except _Bad as bad:
            raise CorruptChunk(f"{where} is {bad.reason}",
                               hint="the repository is damaged; restore from another backup",
                               digest=digest, backup=backup, index=index) from None

    def read_chunk(self, manifest: Manifest, index: int) -> bytes:
        """The verified bytes of chunk `index` of a backup (zeros for an all-zero chunk).

        Thread-safe. Raises CorruptChunk (missing, undecodable, or wrong digest; names chunk,
        digest and backup) or RepositoryUnavailable (the storage cannot be reached: transient,
        retry).
        """
        length = manifest.chunk_length(index)
        digest = manifest.chunks[index]
        if digest is None:
            return bytes(length)
        return self.load_chunk(digest, length, backup=manifest.id, index=index)

    def chunk_digests(self) -> list[str]:
        """Digests of every chunk file in the repository."""
        out: list[str] = []
        for sub in self.storage.list("chunks"):
            out.extend(self.storage.list(f"chunks/{sub}"))
        return out
