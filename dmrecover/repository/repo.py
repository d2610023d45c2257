"""The backup repository: format, chunks, the writer lock, `read_chunk()`.

Format (version 1, see docs/architecture.md)::

    REPO/config.json        {"format": "dmrecover-repo", "version": 1, "hash": "blake3", ...}
    REPO/chunks/ab/<digest> zstd frame of the chunk; digest = blake3 hex of the plain bytes
    REPO/backups/<id>.json  manifest
    REPO/lock               flock()ed by writers
    REPO/tmp/               temp files, renamed into place after fsync

Format 2 adds "id" (random) and "encryption" ("aes-256-gcm" by default, or "none") to
config.json and REPO/keys/<key id>.json; encrypted, chunk digests are keyed BLAKE3 and chunks
and manifests are sealed with AES-256-GCM (crypto.py). Format 1 repositories still open.
REPO is a directory or s3://BUCKET/PREFIX (s3.py; locking by lock objects there).

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
import secrets
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
    UsageError,
)
from dmrecover.repository import keys
from dmrecover.repository.crypto import (
    ENCRYPTION,
    AeadCodec,
    MasterKey,
    PlainCodec,
    Tampered,
    password_from_env,
)
from dmrecover.repository.manifest import HASH, Manifest, chunk_key
from dmrecover.repository.s3 import S3Storage, is_s3_url
from dmrecover.repository.store import (
    DIR_MODE,
    FILE_MODE,
    BadObject,
    LocalStorage,
    Storage,
    check_trusted_path,
)
from dmrecover.system.files import fsync_dir

log = logging.getLogger(__name__)

FORMAT = "dmrecover-repo"
VERSION = 2
READABLE_VERSIONS = (1, 2)
ENCRYPTIONS = (ENCRYPTION, "none")
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

    def __init__(self, path: str | os.PathLike[str], storage: Storage | None = None,
                 codec: PlainCodec | None = None) -> None:
        # An s3:// URL stays a string (Path would fold its '//').
        self.path: Path | str = str(path) if is_s3_url(path) else Path(path)
        self.storage = storage or _storage_for(self.path)
        self.config: dict = {}
        self.codec = codec or PlainCodec()
        self.key_id: str | None = None  # the key file that unlocked it (encrypted only)
        self._local = threading.local()

    @property
    def encryption(self) -> str:
        """"aes-256-gcm" or "none" (format 1 is "none")."""
        return self.codec.encryption

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        """The digest a chunk with these bytes is stored under (keyed when encrypted)."""
        return self.codec.chunk_id(data)

    # -- creating and opening

    @classmethod
    def init(cls, path: str | os.PathLike[str], *, encryption: str | None = None,
             password: str | None = None, kdf: dict | None = None) -> Repository:
        """Create an empty repository at path (a new or empty directory, or an s3:// URL
        with nothing under it). encryption None: encrypted when a password is given, else
        "none" (the CLI always says which). An encrypted repository's password defaults to
        DMRECOVER_PASSWORD(_FILE)."""
        if encryption is None:
            encryption = ENCRYPTION if password else "none"
        if encryption not in ENCRYPTIONS:
            raise RepositoryError(f"unknown encryption {encryption!r}",
                                  hint=f"use one of: {', '.join(ENCRYPTIONS)}")
        if encryption != "none":
            password = password or password_from_env()
            if not password:
                raise RepositoryError("a new encrypted repository needs a password",
                                      hint="give --password-file, DMRECOVER_PASSWORD or "
                                      "DMRECOVER_PASSWORD_FILE (or --encryption none)")
        if is_s3_url(path):
            storage: Storage = S3Storage(str(path))
            if not storage.is_empty():
                raise RepositoryError(f"cannot create repository {path}: objects exist under "
                                      "that prefix", hint="choose a new prefix")
            shown = str(path)
        else:
            p = Path(path)
            _make_local_layout(p)
            storage = LocalStorage(p)
            shown = str(p)
        repo_id = secrets.token_hex(16)
        config = {"format": FORMAT, "version": VERSION, "id": repo_id,
                  "hash": HASH if encryption == "none" else AeadCodec.hash_name,
                  "compression": COMPRESSION, "encryption": encryption,
                  "created": time.time()}
        try:
            if encryption != "none":
                assert password is not None
                keys.add_key(storage, MasterKey.generate(repo_id), password, kdf)
            # config.json last: a repository is one once it has a config.
            storage.put_atomic("config.json", (json.dumps(config, indent=2) + "\n").encode())
        except OSError as err:
            raise RepositoryError(f"cannot create repository {shown}: "
                                  f"{err.strerror or err}") from err
        return cls.open(path, password=password)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, password: str | None = None,
             master: MasterKey | None = None) -> Repository:
        """Open an existing repository; clear errors when it is missing or not one, or the
        password does not open it. The password defaults to DMRECOVER_PASSWORD(_FILE).
        master: an already unsealed master key (a session's key cache) instead of a password;
        it must be this repository's."""
        if is_s3_url(path):
            storage: Storage = S3Storage(str(path))
            p: Path | str = str(path)
            try:
                raw = storage.get("config.json")
            except FileNotFoundError:
                raise RepositoryError(f"{p} is not a dmrecover repository (no config.json)",
                                      hint=f"create one with: dmrecover repo init {p}") \
                    from None
        else:
            p = Path(path)
            storage = LocalStorage(p)
            raw = _read_local_config(p)
        try:
            config = json.loads(raw)
        except ValueError:
            config = {}
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise RepositoryError(f"{p} is not a dmrecover repository (config.json is foreign)")
        version = config.get("version")
        encryption = config.get("encryption", "none")
        expected_hash = AeadCodec.hash_name if encryption == ENCRYPTION else HASH
        if version not in READABLE_VERSIONS or config.get("hash") != expected_hash \
                or encryption not in ENCRYPTIONS or (version == 1 and encryption != "none"):
            raise RepositoryError(f"repository {p} has unsupported format version "
                                  f"{version} / hash {config.get('hash')} / encryption "
                                  f"{encryption}",
                                  hint="use the dmrecover version that created it")
        repo = cls(p, storage)
        repo.config = config
        if isinstance(repo.storage, LocalStorage):
            repo.storage.check_trusted()  # as root: nothing another user could write
        if encryption == "none":
            if version >= 2 and keys.key_ids(storage):
                # A downgrade: someone rewrote config.json to make the client skip the crypto.
                raise RepositoryError(f"repository {p} says it is not encrypted but holds key "
                                      "files: config.json was tampered with",
                                      hint="restore config.json or use another copy")
            return repo
        if master is not None:
            if master.repo_id != config.get("id"):
                raise RepositoryError(f"the cached key is for repository {master.repo_id}, "
                                      f"{p} is {config.get('id')}",
                                      hint="config.json was replaced, or the key cache "
                                      "belongs to another repository")
            repo.codec = AeadCodec(master, master.repo_id)
            return repo
        password = password or password_from_env()
        if not password:
            raise RepositoryError(f"repository {p} is encrypted: its password is needed",
                                  hint="give --password-file, DMRECOVER_PASSWORD or "
                                  "DMRECOVER_PASSWORD_FILE")
        master, repo.key_id = keys.unlock(storage, str(p), password, str(config.get("id")))
        repo.codec = AeadCodec(master, master.repo_id)
        return repo

    # -- writer lock

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the writer lock; a second writer gets RepositoryLocked at once."""
        if isinstance(self.storage, S3Storage):
            with self.storage.writer_lock():
                yield
            return
        assert isinstance(self.path, Path)
        try:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
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
        names: dict[str, list[str]] = {}  # authenticated: backup id -> backups before it
        for name in self.storage.list("backups"):
            if not name.endswith(".json"):
                continue
            try:
                payload, prev = self.codec.open_manifest(name[:-5],
                                                         self.storage.get(f"backups/{name}"))
                m = Manifest.from_json(payload, name[:-5])
                if m.id != name[:-5]:
                    raise ValueError(f"it holds backup {m.id}")
                manifests.append(m)
                if prev is not None:
                    names[m.id] = prev
            except Tampered as err:
                problems.append(f"manifest backups/{name} is tampered with: {err}; it is "
                                "ignored")
            except (ValueError, KeyError, TypeError) as err:
                problems.append(f"manifest backups/{name} is corrupt: {err}")
            except FileNotFoundError:
                continue  # deleted meanwhile
            except OSError as err:
                raise RepositoryUnavailable(f"cannot read backups/{name} in {self.path}: "
                                            f"{err.strerror}") from err
        manifests.sort(key=lambda m: (m.created, m.id))
        present = {m.id for m in manifests}
        missing: dict[str, str] = {}
        for m in manifests:
            for gone in names.get(m.id, ()):
                if gone not in present:
                    missing.setdefault(gone, m.id)
        for gone, by in sorted(missing.items()):
            problems.append(f"backup {gone} is missing or unreadable but the later backup {by} "
                            "names it: a manifest was deleted or the repository rolled back")
        return manifests, problems

    def backups(self) -> list[Manifest]:
        """All readable backups, oldest first (unreadable manifests are logged and skipped)."""
        manifests, problems = self.load_all()
        for p in problems:
            log.warning("%s", p)
        return manifests

    def manifest(self, ref: str) -> Manifest:
        """A backup by exact id, else by exact name (the latest backup with that name), else by
        unique id prefix. A reference that is both a name and an id prefix of different
        backups, or an ambiguous prefix, is refused naming every candidate; one that names a
        damaged manifest says what is wrong with it."""
        manifests, problems = self.load_all()
        for p in problems:
            log.warning("%s", p)
        exact = [m for m in manifests if m.id == ref]
        if exact:
            return exact[0]
        damaged = [p for p in problems if p.startswith(f"manifest backups/{ref}.json ")]
        if damaged:
            raise RepositoryError(damaged[0], hint="restore from another backup")
        by_name = [m for m in manifests if m.name == ref]
        by_prefix = [m for m in manifests if m.id.startswith(ref)] if ref else []
        candidates = {m.id: m for m in by_name[-1:] + by_prefix}
        if len(candidates) == 1:
            return next(iter(candidates.values()))
        if len(candidates) > 1:
            what = (f"backup reference {ref!r} is ambiguous: it is the name of backup "
                    f"{by_name[-1].id} and the id prefix of {_ids(by_prefix)}") if by_name \
                else f"backup id prefix {ref!r} is ambiguous: it matches {_ids(by_prefix)}"
            raise BackupNotFound(what, hint="give the full backup id (dmrecover list)")
        raise BackupNotFound(f"no backup {ref!r} in repository {self.path}",
                             hint=f"see the backups with: dmrecover list --repo {self.path}")

    def save_manifest(self, manifest: Manifest) -> None:
        """Write a manifest (after every chunk it names is durable)."""
        self.storage.sync()
        prev = [n[:-5] for n in self.storage.list("backups") if n.endswith(".json")]
        blob = self.codec.seal_manifest(manifest.id, manifest.to_json(), prev)
        self.storage.put_atomic(f"backups/{manifest.id}.json", blob)

    # -- chunks

    def has_chunk(self, digest: str) -> bool:
        return self.storage.exists(chunk_key(digest))

    def put_chunk(self, digest: str, data: bytes | memoryview, *, sync_dir: bool = False) -> int:
        """Compress and store a chunk; returns the stored size. Caller checks dedup first."""
        frame = self.codec.seal_chunk(digest, self._compressor().compress(data))
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
        bound = max_stored_size(length)
        try:
            frame = self.storage.get(chunk_key(digest), max_size=bound)
        except ValueError:
            raise _Bad("not a valid digest") from None
        except BadObject as bad:
            raise _Bad(f"corrupt ({bad.reason})") from None
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
        if len(frame) > bound:
            raise _Bad(f"corrupt (stored chunk larger than {bound} bytes, the most a "
                       f"{length}-byte chunk can take)")
        try:
            frame = self.codec.open_chunk(digest, frame)
        except Tampered as err:
            raise _Bad(f"tampered with or swapped ({err})") from None
        try:
            # A damaged header could claim a huge size: refuse before allocating it.
            if zstandard.frame_content_size(frame) not in (length, -1):
                raise _Bad("corrupt (frame size does not match the chunk)")
            data = self._decompressor().decompress(frame, max_output_size=length)
        except zstandard.ZstdError as err:
            raise _Bad(f"corrupt (cannot decompress: {err})") from None
        if len(data) != length or self.codec.chunk_id(data) != digest:
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

    # -- keeping the repository apart from what is written elsewhere

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """True when path is the repository, lies inside it, or is one of its files under any
        name (symlink, hard link, bind mount: compared by device and inode). False for a
        repository that is not a local directory."""
        return isinstance(self.storage, LocalStorage) and self.storage.contains(path)

    def is_within(self, path: str | os.PathLike[str]) -> bool:
        """True when the repository lies inside the folder path (by device and inode), or on
        the block device path (its filesystem's device, one under it, or its disk)."""
        return isinstance(self.storage, LocalStorage) and self.storage.is_within(path)

    def check_apart(self, path: str | os.PathLike[str], what: str) -> None:
        """UsageError when path (a destination, overlay or state dir: `what`) is the
        repository, inside it, or holds it: writing there would destroy the backups."""
        if self.contains(path):
            raise UsageError(f"{what} {path} is inside repository {self.path}",
                             hint=f"choose a {what} outside the repository")
        if self.is_within(path):
            raise UsageError(f"{what} {path} holds repository {self.path}",
                             hint=f"choose a {what} that does not hold the repository")

    def chunk_digests(self) -> list[str]:
        """Digests of every chunk file in the repository."""
        out: list[str] = []
        for sub in self.storage.list("chunks"):
            out.extend(self.storage.list(f"chunks/{sub}"))
        return out


def _storage_for(location: Path | str) -> Storage:
    return S3Storage(location) if isinstance(location, str) else LocalStorage(location)


def _make_local_layout(p: Path) -> None:
    """The directories of a new local repository (p new or an empty directory)."""
    check_trusted_path(p)
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
        p.mkdir(mode=DIR_MODE, exist_ok=True)
        for sub in ("chunks", "backups", "tmp", "keys"):
            (p / sub).mkdir(mode=DIR_MODE)
        for i in range(256):
            (p / "chunks" / f"{i:02x}").mkdir(mode=DIR_MODE)
        os.chmod(p, DIR_MODE)  # an existing empty folder too
        (p / "lock").touch(mode=FILE_MODE)
        for d in (p / "chunks", p / "backups", p / "tmp", p / "keys", p):
            fsync_dir(d)
    except OSError as err:
        raise RepositoryError(f"cannot create repository {p}: {err.strerror}") from err


def _read_local_config(p: Path) -> bytes:
    if not p.exists():
        raise RepositoryError(f"repository {p} does not exist",
                              hint=f"create it with: dmrecover repo init {p}")
    if not p.is_dir():
        raise RepositoryError(f"{p} is not a repository (not a directory)",
                              hint="give the path of a directory made by dmrecover repo init")
    try:
        return (p / "config.json").read_bytes()
    except FileNotFoundError:
        raise RepositoryError(f"{p} is not a dmrecover repository (no config.json)",
                              hint="create one with: dmrecover repo init NEWPATH") from None
    except OSError as err:
        raise RepositoryUnavailable(f"cannot read repository {p}: {err.strerror}") from err


def _ids(manifests: list[Manifest]) -> str:
    ids = [m.id for m in manifests]
    return ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")


def max_stored_size(length: int) -> int:
    """The most bytes a stored chunk of `length` plain bytes can take: zstd's compress bound
    (ZSTD_COMPRESSBOUND) plus room for an envelope (an AEAD nonce and tag). A bigger stored
    object is corrupt, and is never read further than this."""
    small = ((128 << 10) - length) >> 11 if length < (128 << 10) else 0
    return length + (length >> 8) + small + 512
