"""Backup manifests and chunk digests.

A manifest names one backup: the volume's size, its chunking and the digest (blake3 hex of
the uncompressed bytes) of every chunk, None for an all-zero chunk. Stored as
REPO/backups/<id>.json; chunks as REPO/chunks/<2 hex>/<digest> (`chunk_key`).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import blake3

HASH = "blake3"
MIN_CHUNK = 64 << 10
MAX_CHUNK = 16 << 20


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The chunk digest: blake3 hex of the uncompressed bytes."""
    return blake3.blake3(data).hexdigest()


def chunk_key(digest: str) -> str:
    """The storage key of the chunk with this digest."""
    return f"chunks/{digest[:2]}/{digest}"


@dataclass
class Manifest:
    """One backup: the volume's size, its chunking, and the digest of every chunk."""

    id: str
    name: str
    created: float
    size: int
    chunk_size: int
    hash: str
    fstype: str | None
    source: str
    chunks: list[str | None]
    # Set by backup() only, not stored: what this backup added to the repository.
    stats: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk `index` (the last one may be short)."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range 0..{self.chunk_count - 1}")
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def created_iso(self) -> str:
        return datetime.fromtimestamp(self.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def summary(self) -> dict:
        """Everything but the digests, for `list --json`."""
        stored = [d for d in self.chunks if d is not None]
        return {
            "id": self.id,
            "name": self.name,
            "created": self.created,
            "created_iso": self.created_iso,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "hash": self.hash,
            "fstype": self.fstype,
            "source": self.source,
            "chunk_count": self.chunk_count,
            "stored_chunks": len(stored),
            "unique_chunks": len(set(stored)),
        }

    def to_json(self) -> bytes:
        d = {k: getattr(self, k) for k in
             ("id", "name", "created", "size", "chunk_size", "hash", "fstype", "source",
              "chunks")}
        return (json.dumps(d, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        m = cls(
            id=str(d["id"]), name=str(d["name"]), created=float(d["created"]),
            size=int(d["size"]), chunk_size=int(d["chunk_size"]), hash=str(d["hash"]),
            fstype=d.get("fstype"), source=str(d.get("source", "")), chunks=list(d["chunks"]),
        )
        expected = -(-m.size // m.chunk_size) if m.chunk_size > 0 else -1
        if m.chunk_size <= 0 or len(m.chunks) != expected:
            raise ValueError(f"{len(m.chunks)} digests for {m.size} bytes in "
                             f"{m.chunk_size}-byte chunks")
        return m


def new_backup_id() -> str:
    """16 hex digits: the creation time in seconds (so ids sort by age) plus randomness."""
    return f"{int(time.time()):08x}{secrets.token_hex(4)}"
