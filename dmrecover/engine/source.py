"""Where the pseudo-volume's chunks come from: the ChunkSource protocol, and MemorySource (an
in-memory source with fault injection, for tests and benchmarks). Also importable from
dmrecover.engine.fetcher."""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

from dmrecover.errors import CorruptChunk, RepositoryUnavailable


@runtime_checkable
class ChunkSource(Protocol):
    """Where the pseudo-volume's chunks come from.

    `read_chunk(index)` returns exactly the chunk's bytes (chunk_size, the last one may be
    shorter), verified; it is thread-safe and raises errors.RepositoryUnavailable (transient:
    retry later) or errors.CorruptChunk (permanent). `is_zero(index)` is True for a chunk known
    to be all zeros without reading it.
    """

    size: int
    chunk_size: int
    chunk_count: int

    def read_chunk(self, index: int) -> bytes: ...

    def is_zero(self, index: int) -> bool: ...


def chunk_length(source: ChunkSource, index: int) -> int:
    """Length in bytes of chunk `index` of `source` (the last chunk may be short)."""
    start = index * source.chunk_size
    return max(0, min(source.chunk_size, source.size - start))


class MemorySource:
    """An in-memory ChunkSource, for tests and benchmarks, with fault injection.

    zero_chunks: indexes reported by is_zero() (default: every all-zero chunk).
    transient_failures: the next N read_chunk() calls raise RepositoryUnavailable.
    unavailable: while True, every read_chunk() raises RepositoryUnavailable.
    corrupt: indexes whose read raises CorruptChunk.
    delay: seconds each read_chunk() sleeps (a slow repository).
    """

    def __init__(self, data: bytes | bytearray, chunk_size: int, *,
                 zero_chunks: set[int] | None = None, delay: float = 0.0) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.data = bytes(data)
        self.size = len(self.data)
        self.chunk_size = chunk_size
        self.chunk_count = (self.size + chunk_size - 1) // chunk_size
        if zero_chunks is None:
            zero_chunks = {i for i in range(self.chunk_count)
                           if not any(self.data[i * chunk_size:(i + 1) * chunk_size])}
        self.zero_chunks = zero_chunks
        self.delay = delay
        self.transient_failures = 0
        self.unavailable = False
        self.corrupt: set[int] = set()
        self.reads: list[int] = []  # indexes read, in order (tests count fetches)
        self._lock = threading.Lock()

    def read_chunk(self, index: int) -> bytes:
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        with self._lock:
            self.reads.append(index)
            if self.unavailable:
                raise RepositoryUnavailable("test repository unavailable")
            if self.transient_failures > 0:
                self.transient_failures -= 1
                raise RepositoryUnavailable("test repository briefly unavailable")
        if self.delay:
            time.sleep(self.delay)
        if index in self.corrupt:
            raise CorruptChunk(f"chunk {index} is corrupt (test)", index=index)
        return self.data[index * self.chunk_size:(index + 1) * self.chunk_size]

    def is_zero(self, index: int) -> bool:
        return index in self.zero_chunks
