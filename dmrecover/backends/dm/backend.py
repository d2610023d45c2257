"""The device-mapper backend: dm-snapshot over a read-only FUSE origin and a sparse COW.

The kernel takes the application's writes (into the COW); the engine only serves the origin.
It needs root and device-mapper with the snapshot target, and is preferred where it runs: the
write path is the kernel's, and the cutover can happen online, under the running application.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from dmrecover.backends.base import Backend, BackendContext, Leftover, SessionLookup
from dmrecover.backends.dm import dmsetup, leftovers, merge, waitpath
from dmrecover.backends.dm.stack import ORIGIN_SUBDIR, DmStack, cow_size
from dmrecover.backends.fuse.stack import teardown_leftovers

if TYPE_CHECKING:  # typing only: the engine is a lower layer, imported for annotations
    from dmrecover.engine.pseudovolume import PseudoVolume


class DmBackend(Backend):
    """PseudoVolume (read-only) -> FUSE -> loop -r = origin; COW file -> loop; dm snapshot."""

    name = "dm"
    description = "device-mapper snapshot over a read-only FUSE origin (the kernel takes " \
                  "the writes; online cutover)"
    priority = 10
    kernel_takes_writes = True
    supports_online_cutover = True
    resume_at_boot = True

    def probe(self) -> None:
        """Root (else NotRootError), dmsetup, the device-mapper driver, its snapshot target and
        the multipath target the origin's source waits in (else BackendUnavailable naming the
        missing piece)."""
        dmsetup.probe(("snapshot", waitpath.TARGET))

    def present(self, volume: PseudoVolume, ctx: BackendContext) -> DmStack:
        return DmStack(volume, ctx)

    def overlay_file(self, size: int) -> tuple[str, int] | None:
        return merge.COW_FILE, cow_size(size)

    def merge_into_dest(self, volume: PseudoVolume, ctx: BackendContext) -> int:
        return merge.merge_into_dest(volume, ctx.engine_dir, ctx.dest, ctx.session)

    def finish_online_cutover(self, ctx: BackendContext) -> None:
        """The COW is merged into DEST: record it durably, then drop the COW file."""
        merge.mark_merged(ctx.engine_dir)
        merge.discard_cow(ctx.engine_dir)

    def dead_source_waits(self, ctx: BackendContext) -> bool:
        return waitpath.waits(ctx.session)

    def serve_dead_source(self, volume: PseudoVolume, ctx: BackendContext
                          ) -> Callable[[], None]:
        return waitpath.serve_again(volume, ctx.session, ctx.engine_dir)

    def teardown_dead(self, ctx: BackendContext) -> list[str]:
        """The session's dm devices (and mounts of them), then its origin: FUSE and loops."""
        done = leftovers.teardown_session_devices(ctx.session)
        done += teardown_leftovers(ctx.engine_dir, os.path.join(ctx.engine_dir, ORIGIN_SUBDIR))
        if os.path.abspath(ctx.state_dir) != os.path.abspath(ctx.engine_dir):
            done += teardown_leftovers(ctx.state_dir)  # overlay elsewhere (--overlay DIR)
        return done

    def leftovers(self, sessions: SessionLookup) -> list[Leftover]:
        return leftovers.find(sessions)

    def remove_leftover(self, item: Leftover) -> None:
        leftovers.remove(item)
