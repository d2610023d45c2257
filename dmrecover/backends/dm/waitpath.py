"""A source device that waits, rather than fails, while no session process serves it.

The kernel's side of a session (dm-clone's hydration, dm-snapshot's copy-on-write through the
dm origin) reads its source from a loop over the FUSE file the session process serves. When
that process dies (SIGKILL, OOM, a bug), the FUSE connection aborts and every read of the loop
fails at once: a write smaller than a clone region or a COW chunk (the kernel must copy the
region or chunk from the source first) then fails with EIO, a filesystem whose journal or
checkpoint writes fail that way is damaged, and a snapshot whose copy fails is invalidated.
Acknowledged writes must survive a crash of the tool, so the source is a one-path dm
`multipath` device with `queue_if_no_path` over the loop:

    loop over FUSE -> dm multipath (queue_if_no_path) = dmrecover-<session>-source

When the loop fails, multipath fails the path and queues the I/O (the application waits, as
on an NFS hard mount) until the path comes back: `revive()` loads a table naming a new loop
(over a new FUSE server of the same volume), swapped in with a no-flush suspend so queued I/O
is handed to the new path, never failed. `release()` (`fail_if_no_path`) is for tearing down
a session nobody will serve again: then queued I/O fails rather than hanging the teardown.

bio-based (`queue_mode bio`): the loop under it needs no request queue of dm's, and the
no-flush suspend hands the queued bios back to dm, which maps them through the new table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from dmrecover.backends.base import UndoStack
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm import ioctl
from dmrecover.backends.fuse.stack import start_server
from dmrecover.errors import StackError
from dmrecover.system import loops
from dmrecover.system.mounts import mount_at, umount_or_detach
from dmrecover.testhooks import fault_point

if TYPE_CHECKING:  # annotations only: the engine is a lower layer
    from dmrecover.engine.pseudovolume import PseudoVolume

log = logging.getLogger(__name__)

TARGET = "multipath"
LAYER = "source"
#: Where `serve_again` serves the volume (the dead server's mount is left to the teardown).
RESCUE_SUBDIR = "origin-rescue"
RESCUE_FILE = "volume"


class SourceLayer:
    """The source step of a stack (DmStack, CloneStack): `_make_source` over `origin_loop`,
    its undo `_remove_source`. The stack has session, origin_loop, volume, undo, source and
    _changed()."""

    session: str
    origin_loop: str | None
    source: str | None
    volume: PseudoVolume
    undo: UndoStack

    def _changed(self) -> None:
        raise NotImplementedError

    def _make_source(self) -> None:
        fault_point("source")
        assert self.origin_loop
        self.source = create(self.session, self.origin_loop, self.volume.size)
        self.undo.push("source", self._remove_source)
        self._changed()

    def _remove_source(self) -> None:
        name, self.source = self.source, None
        if name is not None:
            dm.remove(name)
        self._changed()


def table(device: str, size_bytes: int) -> str:
    """One path group of one path, queueing while it has failed."""
    return (f"0 {dm.sectors(size_bytes)} {TARGET} 3 queue_if_no_path queue_mode bio 0 1 1 "
            f"round-robin 0 1 1 {device} 1")


def create(session: str, device: str, size_bytes: int) -> str:
    """The session's waiting source over `device` (read-only); returns its dm name."""
    name = dm.dm_name(session, LAYER)
    if dm.info(name) is not None:
        raise StackError(f"device-mapper device {name} exists already",
                         hint="a dead session left it: run `dmrecover cleanup`")
    dm.create(name, table(device, size_bytes), dm.dm_uuid(session, LAYER), read_only=True)
    return name


def exists(session: str) -> bool:
    return dm.info(dm.dm_name(session, LAYER)) is not None


def revive(name: str, device: str, size_bytes: int) -> None:
    """Point the source at `device` (a new loop over a new server): I/O queued while no path
    served it goes to the new one, none fails."""
    # No flush: a flushing suspend turns queueing off and fails what is queued.
    ioctl.suspend(name, flush=False)
    try:
        ioctl.load(name, table(device, size_bytes), read_only=True)
    except BaseException:
        ioctl.resume(name)
        raise
    ioctl.resume(name)
    log.info("%s now reads from %s", name, device)


def release(name: str) -> None:
    """Stop queueing: what waits (and what comes) fails at once if no path serves it. For a
    teardown that no server will ever answer (unmounting would hang on queued writes)."""
    if dm.info(name) is not None:
        dm.message(name, "fail_if_no_path")


def waits(session: str) -> bool:
    """A (dead) session's source is there: the kernel's reads of it queue."""
    return dm.available(TARGET) and exists(session)


def serve_again(volume: PseudoVolume, session: str, engine_dir: str) -> Callable[[], None]:
    """A new FUSE server of `volume` (read-only) and a new loop under a dead session's source:
    the kernel's queued reads complete, so the teardown after it (the application stopped, the
    filesystem unmounted, its dirty data written) fails no I/O. The returned call stops it."""
    d = os.path.join(engine_dir, RESCUE_SUBDIR)
    os.makedirs(d, mode=0o700, exist_ok=True)
    if mount_at(d) is not None:  # an earlier rescue that died midway left its mount
        umount_or_detach(d)
    server = start_server(volume, d, RESCUE_FILE, read_only=True)
    try:
        loop = loops.attach(os.path.join(d, RESCUE_FILE), read_only=True)
    except BaseException:
        server.stop()
        raise
    try:
        revive(dm.dm_name(session, LAYER), loop, volume.size)
    except BaseException:
        loops.detach(loop)
        server.stop()
        raise

    def stop() -> None:
        # The teardown removed the source and detached the loop (a file under the state dir)
        # unless it failed first: then the source may still use it (detached: autoclear).
        backing = loops.backing_file(loop)
        if backing and os.path.dirname(backing) == d:
            loops.detach(loop, wait=0)
        server.stop()
    return stop
