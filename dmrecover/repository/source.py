"""A backup in a repository, seen as a chunk source for the live-restore engine.

The engine reads chunks through its `ChunkSource` protocol (size, chunk_size, chunk_count,
read_chunk, is_zero); this class satisfies it structurally, so neither the engine nor the
repository imports the other.
"""

from __future__ import annotations

from dmrecover.errors import CorruptChunk
from dmrecover.repository.manifest import Manifest
from dmrecover.repository.repo import Repository


class RepositorySource:
    """The chunks of one backup: verified bytes from `repo.read_chunk`, None digests are
    all-zero chunks."""

    def __init__(self, repo: Repository, manifest: Manifest) -> None:
        self.repo = repo
        self.manifest = manifest
        self.size = int(manifest.size)
        self.chunk_size = int(manifest.chunk_size)
        self.chunk_count = len(manifest.chunks)
        expected = (self.size + self.chunk_size - 1) // self.chunk_size
        if self.chunk_count != expected:
            raise CorruptChunk(f"backup manifest lists {self.chunk_count} chunks, its size "
                               f"needs {expected}", hint="verify the repository")

    def read_chunk(self, index: int) -> bytes:
        """The verified bytes of chunk `index` (CorruptChunk, RepositoryUnavailable)."""
        return self.repo.read_chunk(self.manifest, index)

    def is_zero(self, index: int) -> bool:
        """True for an all-zero chunk (stored as no chunk at all)."""
        return self.manifest.chunks[index] is None
