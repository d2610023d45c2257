"""The portable backend: the pseudo-volume as a FUSE file, on loop, mounted."""

from dmrecover.backends.fuse.backend import FuseBackend

__all__ = ["FuseBackend"]
