"""The portable backend: the pseudo-volume as a FUSE file, on a loop device, mounted at MP.

It runs wherever FUSE and loop devices do. The engine takes every write (into its overlay),
so the restart cutover merges the overlay into DEST with the application stopped.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dmrecover.backends.base import Backend, BackendContext, Leftover, SessionLookup
from dmrecover.backends.fuse import leftovers
from dmrecover.backends.fuse.stack import FuseStack, teardown_leftovers
from dmrecover.errors import BackendUnavailable
from dmrecover.system import command

if TYPE_CHECKING:  # typing only: the engine is a lower layer, imported for annotations
    from dmrecover.engine.pseudovolume import PseudoVolume


class FuseBackend(Backend):
    """PseudoVolume -> FUSE file -> loop -> mount."""

    name = "fuse"
    description = "FUSE file on a loop device (portable; the engine takes the writes)"
    priority = 0
    kernel_takes_writes = False
    supports_online_cutover = False
    resume_at_boot = False

    def probe(self) -> None:
        """Needs /dev/fuse, fusermount3 (to unmount) and losetup."""
        if not os.path.exists("/dev/fuse"):
            raise BackendUnavailable("the fuse backend needs /dev/fuse, which is missing",
                                     hint="load the fuse module (modprobe fuse)")
        for tool, package in (("fusermount3", "fuse3"), ("losetup", "util-linux")):
            if not command.have(tool):
                raise BackendUnavailable(f"the fuse backend needs {tool}, which is not "
                                         "installed", hint=f"install the {package} package")

    def present(self, volume: PseudoVolume, ctx: BackendContext) -> FuseStack:
        return FuseStack(volume, ctx)

    def merge_into_dest(self, volume: PseudoVolume, ctx: BackendContext) -> int:
        """The engine copies its overlay into DEST (idempotent: it writes a merged marker)."""
        return volume.merge_overlay_into_dest()

    def teardown_dead(self, ctx: BackendContext) -> list[str]:
        return teardown_leftovers(ctx.state_dir)

    def leftovers(self, sessions: SessionLookup) -> list[Leftover]:
        return leftovers.find(sessions)

    def remove_leftover(self, item: Leftover) -> None:
        leftovers.remove(item)
