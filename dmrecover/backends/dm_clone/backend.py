"""The dm-clone backend: the kernel clones DEST from the read-only origin the engine serves.

Needs root and device-mapper with the `clone` target (RHEL, Fedora, Ubuntu and Arch kernels
ship dm-clone; Debian's do not: the test VM builds it, see vagrant/build-box.sh). Where it
runs, `auto` prefers it to the snapshot backend: reads of hydrated regions and every write stay
in the kernel on DEST, and the cutover is a table swap (no merge, no application stop).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from dmrecover.backends.base import Backend, BackendContext, Leftover, SessionLookup
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm import leftovers, merge, waitpath
from dmrecover.backends.dm_clone import target
from dmrecover.backends.dm_clone.stack import (
    LAYER,
    META_FILE,
    ORIGIN_FILE,
    ORIGIN_SUBDIR,
    CloneStack,
    make_sparse,
    staging_path,
    wait_hydrated,
)
from dmrecover.backends.fuse.stack import teardown_leftovers
from dmrecover.engine.pseudovolume import MERGED_MARKER
from dmrecover.errors import StackError
from dmrecover.system import loops

if TYPE_CHECKING:  # typing only: the engine is a lower layer, imported for annotations
    from dmrecover.engine.pseudovolume import PseudoVolume


class DmCloneBackend(Backend):
    """PseudoVolume (read-only, on a staging file) -> FUSE -> loop -r = source; dm clone
    (metadata on a loop file) hydrates DEST in the kernel."""

    name = "dm-clone"
    description = "device-mapper clone of DEST from a read-only FUSE origin (the kernel " \
                  "hydrates DEST and takes the writes; online cutover without a merge)"
    priority = 20
    kernel_takes_writes = True
    supports_online_cutover = True
    resume_at_boot = True

    def probe(self) -> None:
        """Root, dmsetup, device-mapper, its `clone` target (module dm-clone) and the
        `multipath` target the source waits in (module dm-multipath, see dm/waitpath.py)."""
        dm.probe((target.TARGET, waitpath.TARGET))

    def engine_dest(self, ctx: BackendContext) -> str:
        """The engine restores into a sparse staging file: the clone target is DEST's only
        writer."""
        path = staging_path(ctx.engine_dir)
        os.makedirs(ctx.engine_dir, mode=0o700, exist_ok=True)
        make_sparse(path, ctx.size)
        return path

    def overlay_file(self, size: int) -> tuple[str, int] | None:
        return META_FILE, target.metadata_size(size)

    def present(self, volume: PseudoVolume, ctx: BackendContext) -> CloneStack:
        return CloneStack(volume, ctx)

    def merge_into_dest(self, volume: PseudoVolume, ctx: BackendContext) -> int:
        """Restart-mode cutover, after teardown: the clone re-created from its metadata over
        the complete staging file hydrates the regions still missing from DEST. Idempotent.
        Returns the bytes the kernel still copied."""
        if os.path.exists(os.path.join(ctx.engine_dir, MERGED_MARKER)):
            return 0  # finished before a crash: the marker is written last
        if not volume.restored_all():
            raise StackError("the restore is not complete: DEST cannot be finished yet",
                             hint="wait for the restore, then run the cutover again")
        meta = os.path.join(ctx.engine_dir, META_FILE)
        if not os.path.exists(meta):
            raise StackError(f"the clone's metadata {meta} is missing: which regions of DEST "
                             "hold data is unknown", hint="restore offline (dmrecover restore)")
        volume.flush()
        made: list[str] = []
        name = dm.dm_name(ctx.session, "finish")
        try:
            src = loops.attach(staging_path(ctx.engine_dir), read_only=True)
            made.append(src)
            meta_dev = loops.attach(meta)
            made.append(meta_dev)
            dest_dev = ctx.dest
            if not stat.S_ISBLK(os.stat(ctx.dest).st_mode):
                dest_dev = loops.attach(ctx.dest)
                made.append(dest_dev)
            dm.create(name, target.clone_table(meta_dev, dest_dev, src, volume.size,
                                               hydrate=True),
                      dm.dm_uuid(ctx.session, "finish"))
            before = target.status(name)
            done = wait_hydrated(name)
            copied = (done.hydrated - before.hydrated) * done.region_sectors * dm.SECTOR
        finally:
            if dm.info(name) is not None:
                dm.remove(name)
            for dev in reversed(made):
                loops.detach(dev)
        if not stat.S_ISBLK(os.stat(ctx.dest).st_mode):
            fd = os.open(ctx.dest, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        # The session's "merged" marker (the engine refuses to discard before it), then the
        # files the hydration consumed.
        merge.mark_merged(ctx.engine_dir)
        self.finish_online_cutover(ctx)
        return copied

    def finish_online_cutover(self, ctx: BackendContext) -> None:
        """DEST is whole: drop the clone's metadata and the engine's staging copy."""
        for f in (META_FILE, os.path.basename(staging_path(ctx.engine_dir))):
            try:
                os.unlink(os.path.join(ctx.engine_dir, f))
            except FileNotFoundError:
                pass

    def dead_source_waits(self, ctx: BackendContext) -> bool:
        return waitpath.waits(ctx.session)

    def serve_dead_source(self, volume: PseudoVolume, ctx: BackendContext
                          ) -> Callable[[], None]:
        return waitpath.serve_again(volume, ctx.session, ctx.engine_dir)

    def teardown_dead(self, ctx: BackendContext) -> list[str]:
        """The session's dm devices (and mounts of them), its source (FUSE, loops) and the
        loop on a DEST file."""
        done = leftovers.teardown_session_devices(ctx.session)
        done += teardown_leftovers(ctx.engine_dir, os.path.join(ctx.engine_dir, ORIGIN_SUBDIR))
        if os.path.exists(ctx.dest) and not stat.S_ISBLK(os.stat(ctx.dest).st_mode):
            for dev in loops.loop_of(ctx.dest):
                loops.detach(dev)
                done.append(f"detached {dev}")
        return done

    def leftovers(self, sessions: SessionLookup) -> list[Leftover]:
        # The dm backend's leftovers() lists every dmrecover device-mapper device (clone
        # devices included: one UUID prefix) and the fuse backend's the FUSE mounts and loops
        # under state dirs; listing them here too would remove them twice.
        return []

    def remove_leftover(self, item: Leftover) -> None:
        leftovers.remove(item)


__all__ = ["DmCloneBackend", "LAYER", "ORIGIN_FILE"]
