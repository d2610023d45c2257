"""Opening the pseudo-volume (the engine) a session record describes; the session's claims on
its DEST and mount point."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from dmrecover import testhooks
from dmrecover.backends.base import Backend
from dmrecover.engine.fetcher import ON_LOST, ChunkSource
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.repository import keys
from dmrecover.repository.manifest import Manifest
from dmrecover.repository.repo import Repository
from dmrecover.repository.source import RepositorySource
from dmrecover.session.record import SessionRecord
from dmrecover.system import claims
from dmrecover.system.claims import Claim

RESTORER_THREAD = "dmrecover-restorer"
DEST_HEAD = "dest-head"
# The unsealed master key of an encrypted repository, for resume without a person (keys.py).
KEY_CACHE = "repo.key"


def key_cache_path(state_dir: str) -> str:
    return os.path.join(state_dir, KEY_CACHE)


def forget_key(record: SessionRecord) -> None:
    """Drop the session's cached repository key (done: the repository is not needed again)."""
    keys.forget_cache(key_cache_path(record.state_dir))


class _ThrottledSource:
    """Test hook (testhooks.restore_delay): slows the background restorer's fetches only, so
    the application really runs during the restore of a small test volume. One delay at a
    time, whatever the restorer's parallel fetches: the restore lasts as long with any pool."""

    def __init__(self, inner: ChunkSource, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self._pace = threading.Lock()
        self.size = inner.size
        self.chunk_size = inner.chunk_size
        self.chunk_count = inner.chunk_count

    def read_chunk(self, index: int) -> bytes:
        if threading.current_thread().name == RESTORER_THREAD:
            with self._pace:
                time.sleep(self._delay)
        return self._inner.read_chunk(index)

    def is_zero(self, index: int) -> bool:
        return self._inner.is_zero(index)


# The repository and manifest live-restore opened, for the session process it forks (or runs
# in the foreground): no second open (for S3: its GETs and a new client; the manifest's
# decryption). In memory only: the key never leaves the process by this way.
_handed: dict[tuple[str, str], tuple[Repository, Manifest]] = {}


def hand_over(location: str, repo: Repository, manifest: Manifest) -> None:
    """Keep the opened repository and manifest for open_volume of the session at location."""
    _handed[(location, manifest.id)] = (repo, manifest)


def open_volume(record: SessionRecord, backend: Backend,
                on_restored: Callable[[], None] | None = None) -> PseudoVolume:
    """The session's PseudoVolume over its backup, DEST and engine dir. Read-only where the
    backend's kernel side takes the application's writes (the engine then serves an origin)."""
    # An encrypted repository opens with the key cached at the start (resume after a crash
    # or at boot has no password), else with DMRECOVER_PASSWORD(_FILE).
    opened = _handed.pop((record.repo, record.backup), None)
    if opened is not None:
        repo, manifest = opened
    else:
        master = keys.load_cache(key_cache_path(record.state_dir), record.repo)
        repo = Repository.open(record.repo, master=master)
        manifest = repo.manifest(record.backup)
    source: ChunkSource = RepositorySource(repo, manifest)
    delay = testhooks.restore_delay()
    if delay > 0:
        source = _ThrottledSource(source, delay)
    # A kernel origin must never see a read error (it invalidates a dm-snapshot for good):
    # its reads always wait for a lost repository.
    on_lost = "block" if backend.kernel_takes_writes else record.on_repository_lost
    # The backend says where the engine restores to (dm-clone: a staging file, not DEST).
    target = backend.engine_dest(record.context())
    # DEST is marked (its head kept aside) while the engine restores into it.
    mark = dest_head_path(record.state_dir) if os.path.abspath(target) == record.dest else None
    return PseudoVolume(source, target, record.engine_path, mark_dest=mark,
                        fetch_deadline=float(record.fetch_deadline or 600.0),
                        read_only=backend.kernel_takes_writes, on_restored=on_restored,
                        map_dir=record.state_dir,  # never on the overlay's space
                        on_repository_lost=on_lost if on_lost in ON_LOST else "block",
                        checkpoint_log_bytes=testhooks.checkpoint_log_bytes())


def dest_head_path(state_dir: str) -> str:
    """Where DEST's first 4 KiB are kept while it is marked incomplete."""
    return os.path.join(state_dir, DEST_HEAD)


def claim_for_session(name: str, dest: str, mountpoint: str, *,
                      exclusive: bool = True) -> list[Claim]:
    """The claims of session `name` on its mount point and DEST (ClaimRefused naming the
    session that holds either). exclusive=False leaves a block DEST's O_EXCL out (it is
    mounted in the last cutover phases)."""
    owner = f"session {name}"
    held = [claims.claim_mountpoint(mountpoint, owner)] if os.path.isdir(mountpoint) else []
    try:
        held.append(claims.claim_destination(dest, owner, exclusive=exclusive))
    except BaseException:
        release_claims(held)
        raise
    return held


def release_claims(held: list[Claim]) -> None:
    """Give the claims up; a DEST file the claim created (still empty) is removed."""
    for c in held:
        c.release()
        if c.created:
            try:
                if os.stat(c.path).st_size == 0:
                    os.unlink(c.path)
            except OSError:
                pass
