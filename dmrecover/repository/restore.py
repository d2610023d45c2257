"""Full offline restore of a backup to a block device or a regular file.

Order of work:

1. Checks, before anything is written: the destination exists (block device) or can be created
   (file), is large enough, is not mounted, held (dm/md/loop) or open in another process, and
   holds no filesystem unless --force; every chunk file the manifest names exists.
2. A thread pool fetches, decompresses and verifies chunks ahead of the writer (zstd and blake3
   release the GIL); the main thread writes them in order with pwrite. Each chunk is verified
   *before* it is written, so a corrupt chunk stops the restore with CorruptChunk and its bad
   bytes never reach the destination (chunks before it are already written; a file this restore
   created is removed).
3. All-zero chunks are not written: a regular file is truncated to zero then to the volume size
   so they are holes; on a block device they are BLKZEROOUT (discard/write-zeroes where the
   device supports it), falling back to writing zeros.
4. fsync before success.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from dmrecover.errors import CorruptChunk, DeviceError
from dmrecover.progress import Progress, Renderer
from dmrecover.repository.manifest import Manifest
from dmrecover.repository.repo import Repository
from dmrecover.system import blockdev as device
from dmrecover.system import claims
from dmrecover.system.files import start_writeback, write_all
from dmrecover.system.mounts import mounts_of

log = logging.getLogger(__name__)

# Start writeback of what was just written so the final fsync has little left to do.
WRITEBACK_EVERY = 64 << 20


def default_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 2) + 1))


def _check_chunks_present(repo: Repository, manifest: Manifest) -> None:
    """Every chunk file the manifest names exists (cheap: one stat per distinct digest)."""
    seen: set[str] = set()
    for index, digest in enumerate(manifest.chunks):
        if digest is None or digest in seen:
            continue
        seen.add(digest)
        if not repo.has_chunk(digest):
            raise CorruptChunk(
                f"chunk {index} ({digest}) of backup {manifest.id} is missing from repository "
                f"{repo.path}; nothing was written",
                hint="the repository is damaged; restore from another backup",
                digest=digest, backup=manifest.id, index=index)


def restore(
    repo: Repository,
    manifest: Manifest,
    dest: str | os.PathLike[str],
    renderer: Renderer | None = None,
    force: bool = False,
    workers: int | None = None,
) -> None:
    """Restore `manifest` from `repo` to `dest` (block device or regular file), durably.

    DEST is claimed first (system.claims: a live-restore or another restore of the same DEST
    is refused, naming its owner) and must be apart from the repository; a file this restore
    creates is private (0600).
    """
    dest = str(dest)
    repo.check_apart(dest, "destination")
    try:
        claim = _claim(dest)
    except DeviceError as err:
        # Refused (held by another, or the device busy): say where it is mounted, if it is.
        where = mounts_of(dest) if os.path.exists(dest) else []
        if where:
            raise DeviceError(f"destination {dest} is mounted on {', '.join(where)}",
                              hint="unmount it first") from err
        raise
    try:
        _restore_claimed(repo, manifest, dest, claim, renderer, force, workers)
    except BaseException:
        if claim.created and claim.fd is not None:
            # Nothing of ours stays behind: the file this restore created goes (the partial
            # restore of an existing file stays, its message says so).
            try:
                os.unlink(dest)
            except FileNotFoundError:
                pass
        raise
    finally:
        claim.release()


def _claim(dest: str) -> claims.Claim:
    """Root claims DEST (system.claims, in a root-only folder). Another user, who can only
    restore to files they may write, opens the file (created 0600, never through a symlink)
    without a claim: root's sessions write only their own files."""
    if os.geteuid() == 0:
        return claims.claim_destination(dest, "restore")
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd, created = os.open(dest, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            fd, created = os.open(dest, flags), False
    except OSError as err:
        raise DeviceError(f"cannot open destination {dest}: {err.strerror}") from None
    return claims.Claim("dest", dest, "restore", [], fd=fd, created=created)


def _restore_claimed(repo: Repository, manifest: Manifest, dest: str, claim: claims.Claim,
                     renderer: Renderer | None, force: bool, workers: int | None) -> None:
    fd = claim.fd
    assert fd is not None
    # Checked again on what was opened: a name swapped since the first check changes nothing.
    repo.check_apart(f"/proc/self/fd/{fd}", "destination")
    device.check_writable_destination(dest, manifest.size, force, claimed=True)
    _check_chunks_present(repo, manifest)
    is_block = claim.is_block
    try:
        if not is_block:
            # Truncating first makes every byte not written below a hole (all-zero chunks).
            os.ftruncate(fd, 0)
            os.ftruncate(fd, manifest.size)
        _copy(repo, manifest, fd, dest, is_block, renderer,
              workers or repo.storage.fetch_concurrency or default_workers())
        os.fsync(fd)
    except CorruptChunk as err:
        if claim.created:
            err.message += "; restore stopped, the partial file was removed"
        else:
            err.message += f"; restore stopped before writing it, {dest} is incomplete"
        raise
    except OSError as err:
        raise DeviceError(f"writing {dest} failed: {err.strerror}") from err


def _copy(repo: Repository, manifest: Manifest, fd: int, dest: str, is_block: bool,
          renderer: Renderer | None, workers: int) -> None:
    progress = Progress("restore", total_bytes=manifest.size, total_items=manifest.chunk_count,
                        renderer=renderer)
    cs = manifest.chunk_size
    window = 3 * workers
    pending: deque[tuple[int, Future[bytes]]] = deque()
    zero_run: list[int] = []  # [start, end) of consecutive zero chunks not yet zeroed
    unsynced_from = 0

    def flush_zero_run() -> None:
        if zero_run and is_block:
            start, end = zero_run
            if not device.zero_out(fd, start, end - start):
                zeros = bytes(cs)
                for off in range(start, end, cs):
                    write_all(fd, zeros[: min(cs, end - off)], off)
        zero_run.clear()

    with ThreadPoolExecutor(workers, thread_name_prefix="restore") as pool:
        nonnull = (i for i, d in enumerate(manifest.chunks) if d is not None)
        try:
            next_index = 0  # next chunk to hand to the writer, in order
            for index in nonnull:
                pending.append((index, pool.submit(repo.read_chunk, manifest, index)))
                if len(pending) < window:
                    continue
                next_index, unsynced_from = _drain_one(
                    pending, manifest, fd, next_index, zero_run, flush_zero_run, progress,
                    unsynced_from)
            while pending:
                next_index, unsynced_from = _drain_one(
                    pending, manifest, fd, next_index, zero_run, flush_zero_run, progress,
                    unsynced_from)
            _zero_until(manifest.chunk_count, manifest, next_index, zero_run, progress)
            flush_zero_run()
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            progress.renderer.close()  # leave the terminal clean for the error line
            raise
    progress.finish()


def _zero_until(stop: int, manifest: Manifest, index: int, zero_run: list[int],
                progress: Progress) -> None:
    """Account the all-zero chunks index..stop-1, extending the pending zero run."""
    if stop <= index:
        return
    start = index * manifest.chunk_size
    end = min(stop * manifest.chunk_size, manifest.size)
    if zero_run:
        zero_run[1] = end
    else:
        zero_run.extend((start, end))
    progress.update(end - start, items=stop - index)


def _drain_one(pending: deque[tuple[int, Future[bytes]]], manifest: Manifest, fd: int,
               next_index: int, zero_run: list[int], flush_zero_run, progress: Progress,
               unsynced_from: int) -> tuple[int, int]:
    index, fut = pending.popleft()
    data = fut.result()  # raises CorruptChunk before anything of this chunk is written
    _zero_until(index, manifest, next_index, zero_run, progress)
    flush_zero_run()
    offset = index * manifest.chunk_size
    write_all(fd, data, offset)
    end = offset + len(data)
    if end - unsynced_from >= WRITEBACK_EVERY:
        start_writeback(fd, unsynced_from, end - unsynced_from)
        unsynced_from = end
    progress.update(len(data), items=1)
    return index + 1, unsynced_from
