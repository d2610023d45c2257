"""The device-mapper backend: dm-snapshot over a read-only FUSE origin and a sparse COW."""

from dmrecover.backends.dm.backend import DmBackend

__all__ = ["DmBackend"]
