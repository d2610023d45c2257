"""The one interface every backend implements, and the undo list its set-ups are built with.

A backend presents a `PseudoVolume` (the engine) at a mount point. The session layer talks to
backends only through `Backend` and `Presentation`; it never names a backend. Adding one is a
new folder under `dmrecover/backends/` with a `Backend` subclass, plus one line in
`dmrecover/backends/registry.py`.

Lifecycle, as the session drives it:

    backend.probe()                                 fail early, with a one-line reason
    volume = PseudoVolume(..., backend.engine_dest(ctx), ...)   where the engine restores to
    p = backend.present(volume, BackendContext)     build the stack (undone on failure)
    p.stats()                                       kernel-side progress for the status
    ...application runs, restore proceeds...
    restart cutover:  p.teardown(); backend.merge_into_dest(volume, ctx)
    online cutover:   p.online_cutover(ctx.dest, on_phase)   (supports_online_cutover only)
    after a crash:    backend.teardown_dead(ctx)     (found by looking, not by trusting records)
    cleanup:          backend.leftovers(sessions) / backend.remove_leftover(item)
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from dmrecover.errors import BackendUnavailable, NotRootError

if TYPE_CHECKING:  # typing only: the engine is a lower layer, imported for annotations
    from dmrecover.engine.pseudovolume import PseudoVolume

log = logging.getLogger(__name__)


class UndoStack:
    """Undo actions of the steps done so far; `unwind()` runs them newest first."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def push(self, name: str, undo: Callable[[], None]) -> None:
        self._undo.append((name, undo))

    def pop(self, name: str) -> Callable[[], None]:
        """Remove the newest undo named `name` and return it (to run it at a chosen time)."""
        for i in range(len(self._undo) - 1, -1, -1):
            if self._undo[i][0] == name:
                return self._undo.pop(i)[1]
        raise KeyError(name)

    def names(self) -> list[str]:
        return [n for n, _ in self._undo]

    def __len__(self) -> int:
        return len(self._undo)

    def unwind(self) -> list[str]:
        """Run every undo, newest first; keep going past failures; return their messages."""
        errors = []
        while self._undo:
            name, undo = self._undo.pop()
            try:
                log.info("undo: %s", name)
                undo()
            except Exception as err:  # undo must go on: one failure must not strand the rest
                log.error("undo %s failed: %s", name, err)
                errors.append(f"undo {name}: {err}")
        return errors


@dataclass(frozen=True)
class BackendContext:
    """What a backend needs to know about the session it serves (no session object)."""

    session: str  # the session's name (dm names, udev links)
    state_dir: str  # the session's private state dir
    engine_dir: str  # where the engine keeps overlay/restored map (and the dm COW)
    mountpoint: str
    fstype: str | None
    dest: str  # DEST: block device or regular file
    size: int  # volume size in bytes
    mount_options: tuple[str, ...] = ()
    on_change: Callable[[dict], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Leftover:
    """Something of a dead session's that cleanup may remove, described for the operator."""

    backend: str
    kind: str  # e.g. "mount", "loop", "fuse", "dm"
    name: str  # what `remove_leftover` needs to find it again (path, device, dm name)

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


class SessionLookup(Protocol):
    """How a backend asks the session layer about state dirs, without importing it."""

    def state_dir_of(self, path: str) -> str | None:
        """The session state dir that holds `path` (a file under it), or None."""

    def state_dir_for(self, session: str) -> str:
        """The default state dir of the session called `session`."""

    def is_live(self, state_dir: str) -> bool:
        """True while a session process owns the state dir."""

    def state(self, state_dir: str) -> str | None:
        """The recorded state of the session in the state dir ("done", ...), or None."""


class Presentation(ABC):
    """A built stack presenting one PseudoVolume at the mount point."""

    undo: UndoStack

    @abstractmethod
    def build(self) -> None:
        """Bring the stack up step by step; on failure undo what was done and re-raise."""

    @abstractmethod
    def teardown(self) -> list[str]:
        """Unmount (StackError, stack intact, while something holds the mount), then undo the
        rest; returns the problems met after the unmount (e.g. a layer that stayed busy)."""

    @abstractmethod
    def devices(self) -> dict:
        """The devices and mounts this stack made, for the session record and status."""

    def stats(self) -> dict:
        """What the kernel side reports about its progress, for the session's status (the
        dm-clone backend: hydrated regions); {} where there is nothing to report."""
        return {}

    def online_cutover(self, dest: str, *,
                       on_phase: Callable[[str], None] | None = None) -> float:
        """Make DEST the volume under the mounted filesystem without stopping the application;
        returns the longest I/O pause in seconds. Only where `supports_online_cutover`."""
        raise NotImplementedError(f"{type(self).__name__} has no online cutover")


class Backend(ABC):
    """A way of presenting the pseudo-volume. Subclasses set the class attributes."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: `auto` picks the available backend with the highest priority.
    priority: ClassVar[int] = 0
    #: The kernel takes the application's writes (the engine serves a read-only origin).
    kernel_takes_writes: ClassVar[bool] = False
    #: `--cutover online`: DEST takes over under the running application.
    supports_online_cutover: ClassVar[bool] = False
    #: A session on this backend is resumed at boot by the systemd unit.
    resume_at_boot: ClassVar[bool] = False

    @abstractmethod
    def probe(self) -> None:
        """Raise BackendUnavailable("... because ...", hint=...) when it cannot run here."""

    def available(self) -> bool:
        """probe() without the error: what `auto` asks (a backend that needs root is not
        available to a non-root caller)."""
        try:
            self.probe()
        except (BackendUnavailable, NotRootError) as err:
            log.debug("backend %s unavailable: %s", self.name, err)
            return False
        return True

    def preload(self) -> None:
        """Import what building the stack will need (slow native bindings), so that a caller
        can do it in a thread beside other waits (the password's key derivation) instead of
        on the recovery's critical path. The default needs nothing."""
        return None

    def engine_dest(self, ctx: BackendContext) -> str:
        """Where the engine writes restored chunks: DEST itself, except where the kernel must
        be DEST's only writer (dm-clone: a staging file in the engine dir, made here)."""
        return ctx.dest

    @abstractmethod
    def present(self, volume: PseudoVolume, ctx: BackendContext) -> Presentation:
        """A Presentation of `volume` (not built yet: the caller calls build())."""

    @abstractmethod
    def merge_into_dest(self, volume: PseudoVolume, ctx: BackendContext) -> int:
        """Restart-mode cutover, after teardown: put the overlay's blocks into DEST durably.
        Idempotent (a crash midway runs it again). Returns the bytes merged."""

    def overlay_file(self, size: int) -> tuple[str, int] | None:
        """The engine-dir file of the kernel's overlay that a block device may stand for
        (`--overlay VG`: a symlink to an LV), and the size that device needs for a volume of
        `size` bytes; None where the overlay cannot live on a block device."""
        return None

    def finish_online_cutover(self, ctx: BackendContext) -> None:
        """After `online_cutover`: drop what the merged overlay left (e.g. the COW file)."""
        return None

    def dead_source_waits(self, ctx: BackendContext) -> bool:
        """True when the kernel side a dead session process left waits for the volume to be
        served again (I/O queued, not failed): the teardown must serve it first
        (`serve_dead_source`), or what waits fails."""
        return False

    def serve_dead_source(self, volume: PseudoVolume, ctx: BackendContext
                          ) -> Callable[[], None]:
        """Serve a dead session's waiting source from `volume` (read-only) until the returned
        call, made after `teardown_dead`."""
        raise NotImplementedError(f"the {self.name} backend has no waiting source")

    @abstractmethod
    def teardown_dead(self, ctx: BackendContext) -> list[str]:
        """Remove what a dead session process of this backend left (mounts, devices, loops,
        FUSE mounts), found by looking at the system. Returns what was done."""

    @abstractmethod
    def leftovers(self, sessions: SessionLookup) -> list[Leftover]:
        """What dead sessions of this backend left anywhere on the system, in removal order
        (what a live session owns, or a finished session still uses, is left alone)."""

    @abstractmethod
    def remove_leftover(self, item: Leftover) -> None:
        """Remove one leftover found by `leftovers()`."""
