"""Backup manifests and chunk digests.

A manifest names one backup: the volume's size, its chunking and the digest (blake3 hex of
the uncompressed bytes) of every chunk, None for an all-zero chunk. Stored as
REPO/backups/<id>.json; chunks as REPO/chunks/<2 hex>/<digest> (`chunk_key`).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import blake3

HASH = "blake3"
# The digests a manifest may name: plain blake3, or blake3 keyed by an encrypted repository's
# key (both 32 bytes, 64 hex digits).
HASHES = (HASH, "blake3-keyed")
MIN_CHUNK = 64 << 10
MAX_CHUNK = 16 << 20
DIGEST_HEX = 64  # blake3's 32-byte digest in lowercase hex
# The most bytes a volume may have (ext4's and xfs's limits are far below; a manifest claiming
# more is damaged, not big).
MAX_SIZE = 1 << 62

_DIGEST_RE = re.compile(rf"[0-9a-f]{{{DIGEST_HEX}}}")
_ID_RE = re.compile(r"[0-9a-f]{16}")


class ManifestError(ValueError):
    """A manifest that does not hold a valid backup (one line saying what is wrong)."""


def is_digest(value: object) -> bool:
    """True for exactly a blake3 digest: 64 lowercase hex characters."""
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def is_backup_id(value: object) -> bool:
    """True for a backup id as `new_backup_id` makes them (16 lowercase hex digits)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The chunk digest: blake3 hex of the uncompressed bytes."""
    return blake3.blake3(data).hexdigest()


def chunk_key(digest: str) -> str:
    """The storage key of the chunk with this digest (ValueError for anything else, so a
    damaged manifest cannot even name a path outside chunks/)."""
    if not is_digest(digest):
        raise ValueError(f"{str(digest)[:80]!r} is not a chunk digest")
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
    def from_json(cls, data: bytes, expected_id: str | None = None) -> Manifest:
        """Parse and validate a stored manifest; ManifestError (one line) when it is damaged
        or (expected_id: the name it is stored under) holds another backup."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ManifestError(f"not JSON ({err})") from None
        if not isinstance(d, dict):
            raise ManifestError("not a JSON object")
        missing = [k for k in ("id", "name", "created", "size", "chunk_size", "hash", "chunks")
                   if k not in d]
        if missing:
            raise ManifestError(f"missing {', '.join(missing)}")
        m = cls(id=d["id"], name=d["name"], created=d["created"], size=d["size"],
                chunk_size=d["chunk_size"], hash=d["hash"], fstype=d.get("fstype"),
                source=d.get("source", ""), chunks=d["chunks"])
        m.validate()
        if expected_id is not None and m.id != expected_id:
            raise ManifestError(f"its id {m.id} does not match its file name")
        return m

    def validate(self) -> None:
        """Every field of the right type and range, sizes and counts consistent, every digest
        exactly a digest; ManifestError naming the first thing wrong."""
        if not is_backup_id(self.id):
            raise ManifestError(f"id {str(self.id)[:40]!r} is not a backup id")
        if not isinstance(self.name, str):
            raise ManifestError("name is not a string")
        if not _is_number(self.created) or not math.isfinite(self.created):
            raise ManifestError("created is not a time")
        if self.hash not in HASHES:
            raise ManifestError(f"hash {str(self.hash)[:20]!r} is not one of "
                                f"{', '.join(HASHES)}")
        if self.fstype is not None and not isinstance(self.fstype, str):
            raise ManifestError("fstype is not a string")
        if not isinstance(self.source, str):
            raise ManifestError("source is not a string")
        if not _is_int(self.size) or not 0 < self.size <= MAX_SIZE:
            raise ManifestError(f"size {str(self.size)[:30]!r} is not a volume size")
        cs = self.chunk_size
        if not _is_int(cs) or cs < MIN_CHUNK or cs > MAX_CHUNK or cs & (cs - 1):
            raise ManifestError(f"chunk size {str(cs)[:30]!r} is not a power of two from "
                                f"{MIN_CHUNK} to {MAX_CHUNK}")
        if not isinstance(self.chunks, list):
            raise ManifestError("chunks is not a list")
        expected = -(-self.size // cs)
        if len(self.chunks) != expected:
            raise ManifestError(f"{len(self.chunks)} digests for {self.size} bytes in "
                                f"{cs}-byte chunks (needs {expected})")
        for index, digest in enumerate(self.chunks):
            if digest is not None and not is_digest(digest):
                raise ManifestError(f"chunk {index} has no valid digest "
                                    f"({str(digest)[:80]!r})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def new_backup_id() -> str:
    """16 hex digits: the creation time in seconds (so ids sort by age) plus randomness."""
    return f"{int(time.time()):08x}{secrets.token_hex(4)}"
