"""`dmrecover cleanup`: find and remove what dead dmrecover sessions left behind.

Each backend finds its own leftovers (by looking at the system, never by trusting records) and
removes them; this module only answers the backends' questions about sessions (`SessionLookup`:
which state dir holds a path, is its session process alive) and goes through every backend of
the registry in turn, in its order (a backend whose devices sit on another's goes first).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from dmrecover.backends import registry
from dmrecover.backends.base import Backend, Leftover
from dmrecover.errors import DmrecoverError
from dmrecover.session.record import SESSION_FILE, lock_held, read_json, session_dir

log = logging.getLogger(__name__)


class StateDirLookup:
    """The session layer's answers to a backend's questions (base.SessionLookup)."""

    def state_dir_of(self, path: str) -> str | None:
        """The nearest ancestor of path holding session.json (a state dir), or None."""
        d = os.path.dirname(os.path.abspath(path))
        while True:
            if os.path.isfile(os.path.join(d, SESSION_FILE)):
                return d
            parent = os.path.dirname(d)
            if parent == d:
                return None
            d = parent

    def state_dir_for(self, session: str) -> str:
        return session_dir(session)

    def is_live(self, state_dir: str) -> bool:
        return lock_held(state_dir)

    def state(self, state_dir: str) -> str | None:
        try:
            data = read_json(os.path.join(state_dir, SESSION_FILE))
        except DmrecoverError:
            return None
        return data.get("state") if data else None


@dataclass(frozen=True)
class Found:
    """One leftover and the backend that removes it."""

    backend: Backend
    item: Leftover

    def __str__(self) -> str:
        return str(self.item)


def find_leftovers(backends: Iterable[Backend] | None = None) -> list[Found]:
    """What dead sessions left, in removal order (every backend of the registry by default)."""
    lookup = StateDirLookup()
    found: list[Found] = []
    for backend in backends if backends is not None else all_backends():
        found += [Found(backend, item) for item in backend.leftovers(lookup)]
    return found


def remove_leftovers(found: Iterable[Found]) -> list[str]:
    """Remove what find_leftovers() found; returns the problems (empty when all went)."""
    problems = []
    for f in found:
        try:
            f.backend.remove_leftover(f.item)
        except DmrecoverError as err:
            log.error("cleanup: %s: %s", f.item, err)
            problems.append(f"{f.item}: {err}")
    return problems


def all_backends() -> list[Backend]:
    return [registry.get(name) for name in registry.names()]
