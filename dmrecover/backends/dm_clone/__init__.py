"""The dm-clone backend: DEST cloned in the kernel from the read-only origin the engine serves."""

from dmrecover.backends.dm_clone.backend import DmCloneBackend

__all__ = ["DmCloneBackend"]
