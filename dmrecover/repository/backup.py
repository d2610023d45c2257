"""Backup: cut a block device or image file into fixed-size chunks and store them.

The main thread reads the source with large sequential reads; a thread pool hashes (blake3),
compresses (zstd) and writes the chunks (both libraries release the GIL, so this scales with
cores). All-zero chunks are not stored; a chunk already in the repository is not written again.
Every chunk is durable (fdatasync, rename, directory fsync) before the manifest that names it is
written, so a backup killed at any moment leaves the repository valid: the manifest is absent and
the chunks already written are simply reused by the next backup.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dmrecover.errors import DeviceError, RepositoryError, UsageError
from dmrecover.progress import Progress, Renderer
from dmrecover.repository.manifest import (
    HASH,
    MAX_CHUNK,
    MIN_CHUNK,
    Manifest,
    new_backup_id,
)
from dmrecover.repository.repo import Repository
from dmrecover.system.blockdev import block_size_of_fd, filesystem_type
from dmrecover.system.mounts import mounts_of
from dmrecover.units import format_size

log = logging.getLogger(__name__)

READ_SIZE = 16 << 20  # read the source in large pieces even for small chunks


def check_chunk_size(chunk_size: int) -> None:
    """A power of two from 64 KiB to 16 MiB, else UsageError."""
    if chunk_size < MIN_CHUNK or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise UsageError(f"bad chunk size {chunk_size}",
                         hint="use a power of two from 64K to 16M, e.g. --chunk-size 4M")


def default_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 2) + 1))


def open_source(source: str | os.PathLike[str]) -> int:
    """Open a block device or regular file for reading; DeviceError with one line otherwise."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise DeviceError(f"source {source} does not exist",
                          hint="give a block device or an image file") from None
    except OSError as err:
        raise DeviceError(f"cannot access source {source}: {err.strerror}") from err
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise DeviceError(f"source {source} is neither a block device nor a regular file")
    try:
        return os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise DeviceError(f"cannot read source {source}: permission denied",
                          hint="run as root or as a user allowed to read it") from None
    except OSError as err:
        raise DeviceError(f"cannot read source {source}: {err.strerror}") from err


def _pread_full(fd: int, length: int, offset: int, source: str) -> bytes:
    try:
        data = os.pread(fd, length, offset)
        while len(data) < length:
            more = os.pread(fd, length - len(data), offset + len(data))
            if not more:
                raise DeviceError(f"source {source} ended early at byte {offset + len(data)}",
                                  hint="was it resized during the backup?")
            data += more
        return data
    except OSError as err:
        raise DeviceError(f"cannot read source {source} at byte {offset}: {err.strerror}") \
            from err


def _data_extent(fd: int, offset: int, size: int) -> tuple[int, int]:
    """(where the next data at or after offset starts, where it ends) in a sparse file:
    (size, size) when only a hole is left; (offset, size) when the source cannot say (a block
    device, a filesystem without SEEK_DATA): then everything counts as data."""
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as err:
        if err.errno == errno.ENXIO:  # a hole up to the end
            return size, size
        return offset, size
    try:
        hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
    except OSError:
        hole_at = size
    return min(data_at, size), max(min(hole_at, size), data_at + 1)


class _ChunkWriter:
    """Per-chunk work run in the pool: zero test, hash, dedup, compress, store."""

    def __init__(self, repo: Repository, chunk_size: int) -> None:
        self.repo = repo
        self.zero = bytes(chunk_size)
        self.claimed: set[str] = set()
        self.lock = threading.Lock()
        self.new_chunks = 0
        self.new_bytes = 0
        self.stored_bytes = 0
        self.dedup_chunks = 0
        self.zero_chunks = 0

    def __call__(self, data: bytes) -> str | None:
        if data == self.zero[: len(data)]:
            with self.lock:
                self.zero_chunks += 1
            return None
        digest = self.repo.chunk_id(data)  # keyed when the repository is encrypted
        with self.lock:
            if digest in self.claimed:
                self.dedup_chunks += 1
                return digest  # the same content earlier in this backup
            self.claimed.add(digest)
        if self.repo.has_chunk(digest):
            with self.lock:
                self.dedup_chunks += 1
            return digest
        try:
            stored = self.repo.put_chunk(digest, data)
        except OSError as err:
            raise RepositoryError(f"cannot write a chunk to repository {self.repo.path}: "
                                  f"{err.strerror}",
                                  hint="check free space and permissions") from err
        with self.lock:
            self.new_chunks += 1
            self.new_bytes += len(data)
            self.stored_bytes += stored
        return digest


def backup(
    source: str | os.PathLike[str],
    repo: Repository,
    name: str | None = None,
    chunk_size: int = 4 << 20,
    renderer: Renderer | None = None,
    workers: int | None = None,
) -> Manifest:
    """Back up `source` into `repo`; returns the new manifest (its `stats` say what was added)."""
    check_chunk_size(chunk_size)
    fd = open_source(source)
    source = os.path.abspath(source)
    try:
        size = block_size_of_fd(fd)
        if size == 0:
            raise DeviceError(f"source {source} is empty")
        fstype = filesystem_type(source)
        mounts = mounts_of(source)
        if mounts:
            log.warning("%s is mounted on %s: the backup may be inconsistent (unmount it or "
                        "back up a snapshot)", source, ", ".join(mounts))
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
        with repo.lock():
            manifest = _run(fd, source, size, repo, name, chunk_size, fstype, renderer,
                            workers or default_workers())
    finally:
        os.close(fd)
    return manifest


def _run(fd: int, source: str, size: int, repo: Repository, name: str | None,
         chunk_size: int, fstype: str | None, renderer: Renderer | None,
         workers: int) -> Manifest:
    started = time.monotonic()
    count = -(-size // chunk_size)
    digests: list[str | None] = [None] * count
    writer = _ChunkWriter(repo, chunk_size)
    progress = Progress("backup", total_bytes=size, total_items=count, renderer=renderer)
    read_size = max(chunk_size, READ_SIZE)
    window = 2 * workers + max(1, READ_SIZE // chunk_size)
    pending: deque[tuple[int, int, Future[str | None]]] = deque()

    def collect_one() -> None:
        index, length, fut = pending.popleft()
        digests[index] = fut.result()
        progress.update(length, items=1)

    with ThreadPoolExecutor(workers, thread_name_prefix="backup") as pool:
        try:
            offset = 0
            index = 0
            while offset < size:
                # Holes of a sparse source are not read: whole chunks inside a hole are zero
                # chunks as they are; the read stops at the chunk that holds the hole's start.
                data_at, hole_at = _data_extent(fd, offset, size)
                skip = (data_at - offset) // chunk_size
                if skip:
                    for _ in range(skip):
                        length = min(chunk_size, size - offset)
                        writer.zero_chunks += 1
                        progress.update(length, items=1)
                        index += 1
                        offset += length
                    continue
                want = min(read_size, size - offset,
                           -(-(hole_at - offset) // chunk_size) * chunk_size)
                block = _pread_full(fd, want, offset, source)
                for start in range(0, len(block), chunk_size):
                    data = block[start:start + chunk_size] if len(block) > chunk_size else block
                    pending.append((index, len(data), pool.submit(writer, data)))
                    index += 1
                    while len(pending) > window:
                        collect_one()
                offset += len(block)
            while pending:
                collect_one()
        except BaseException:
            for _, _, fut in pending:
                fut.cancel()
            progress.renderer.close()  # leave the terminal clean for the error line
            raise
    manifest = Manifest(
        id=new_backup_id(),
        name=name or Path(source).name,
        created=time.time(),
        size=size,
        chunk_size=chunk_size,
        hash=HASH,
        fstype=fstype,
        source=source,
        chunks=digests,
    )
    # save_manifest() first fsyncs every chunk directory touched above, then the manifest.
    repo.save_manifest(manifest)
    elapsed = time.monotonic() - started
    manifest.stats = {
        "chunks": count,
        "zero_chunks": writer.zero_chunks,
        "new_chunks": writer.new_chunks,
        "dedup_chunks": writer.dedup_chunks,
        "new_bytes": writer.new_bytes,
        "stored_bytes": writer.stored_bytes,
        "elapsed_ms": int(elapsed * 1000),
    }
    progress.finish(f"{writer.new_chunks} new chunks, {format_size(writer.stored_bytes)} "
                    f"stored, {writer.dedup_chunks} deduplicated, {writer.zero_chunks} zero")
    log.info("backup %s of %s: %s", manifest.id, source, manifest.stats)
    return manifest
