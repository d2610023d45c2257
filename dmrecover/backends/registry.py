"""The registry of backends: what `--backend` accepts and what `auto` chooses from.

Adding a backend: a folder under dmrecover/backends/ whose package exports a `Backend`
subclass, and one entry in `_BACKENDS` below. Nothing else in dmrecover names a backend.
"""

from __future__ import annotations

from dmrecover.backends.base import Backend
from dmrecover.backends.dm import DmBackend
from dmrecover.backends.dm_clone import DmCloneBackend
from dmrecover.backends.fuse import FuseBackend
from dmrecover.errors import BackendUnavailable, UsageError

AUTO = "auto"

_BACKENDS: tuple[type[Backend], ...] = (DmCloneBackend, DmBackend, FuseBackend)


def names() -> list[str]:
    """The backend names, for the CLI's --backend choices (plus "auto")."""
    return [b.name for b in _BACKENDS]


def get(name: str) -> Backend:
    """The backend called `name` (not probed)."""
    for b in _BACKENDS:
        if b.name == name:
            return b()
    raise UsageError(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(names())}")


def choose(requested: str) -> Backend:
    """`auto`: the available backend with the highest priority; a named one: probed, so a
    missing piece is one clear BackendUnavailable."""
    if requested != AUTO:
        backend = get(requested)
        backend.probe()
        return backend
    for cls in sorted(_BACKENDS, key=lambda b: -b.priority):
        backend = cls()
        if backend.available():
            return backend
    raise BackendUnavailable("no backend can run on this host",
                             hint="the fuse backend needs /dev/fuse, fusermount3 and losetup")
