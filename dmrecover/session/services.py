"""What the session process acts on, gathered in one object so that tests can hand in fakes.

The runner and the cutover never reach the system directly: the backend (a `Backend` from the
registry), the application (an `Application`), the pseudo-volume (opened by `open_volume`) and
the few host operations of their own (who holds the mount, mounting DEST) all come from a
`Services`. `default_services(record)` builds the real ones; the unit tests build fakes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dmrecover.backends import registry
from dmrecover.backends.base import Backend
from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.session import volume
from dmrecover.session.app import AppHandle
from dmrecover.session.record import SessionRecord
from dmrecover.system.loops import attach as loop_attach
from dmrecover.system.loops import detach as loop_detach
from dmrecover.system.loops import loop_of
from dmrecover.system.mounts import mount, mount_at
from dmrecover.system.processes import describe, processes_holding


class AppControl(Protocol):
    """The application as the session drives it (`dmrecover.session.app.Application`)."""

    handle: AppHandle

    @property
    def tracking_warning(self) -> str | None:
        """Set when the application could not get a cgroup of its own."""

    def start(self) -> AppHandle: ...

    def stop(self) -> list[str]:
        """Stop it whatever it does (escalating to SIGKILL); the warnings on the way."""

    def state(self) -> str: ...

    def processes(self) -> list: ...

    def status(self) -> dict:
        """How it is tracked and how its last stop went (for status.json)."""

    def release(self) -> None:
        """Remove its cgroup once it is stopped for good (abort)."""


class Host(Protocol):
    """The session's own operations on the system (the backend does the rest)."""

    def stray_holders(self, mountpoint: str, mine: set[int]) -> str | None:
        """Processes other than `mine` holding the mount at mountpoint, described, or None."""

    def mount_dest(self, dest: str, mountpoint: str, fstype: str | None,
                   on_loop: Callable[[str], None]) -> None:
        """Mount DEST at mountpoint (through a loop device when DEST is a file)."""


OpenVolume = Callable[[SessionRecord, Backend, Callable[[], None] | None], PseudoVolume]


@dataclass
class Services:
    backend: Backend
    app: AppControl
    open_volume: OpenVolume
    host: Host


ServicesFactory = Callable[[SessionRecord], Services]


class SystemHost:
    """The real host: /proc for the holders, losetup and mount(8) for DEST."""

    def stray_holders(self, mountpoint: str, mine: set[int]) -> str | None:
        others = [p for p in processes_holding(mountpoint) if p.pid not in mine]
        return describe(others) if others else None

    def mount_dest(self, dest: str, mountpoint: str, fstype: str | None,
                   on_loop: Callable[[str], None]) -> None:
        dev = dest
        if stat.S_ISREG(os.stat(dest).st_mode):
            loops = loop_of(dest)
            dev = loops[0] if loops else loop_attach(dest)
            on_loop(dev)
        current = mount_at(mountpoint)
        if current is None or current.source != dev:
            mount(dev, mountpoint, fstype)
        if dev != dest:
            # Detaching a mounted loop only sets autoclear: it goes away by itself when DEST
            # is unmounted, so nothing of ours outlives the filesystem (no waiting for it).
            loop_detach(dev, wait=0)


def default_services(record: SessionRecord) -> Services:
    """The real backend (by the name the record stores), application, volume and host."""
    return Services(backend=registry.get(record.backend), app=record.application(),
                    open_volume=volume.open_volume, host=SystemHost())
