"""The dm-clone backend's stack: build, teardown, hydration and the online cutover.

    PseudoVolume(read_only, DEST = STATE/staging.img) -> FUSE STATE/origin/volume -> loop -r
        -> dm multipath, queue_if_no_path = dmrecover-<session>-source             (source)
    sparse STATE/clone-meta.img -> loop                                    (metadata)
    DEST (block device, or a regular file on a loop)                       (destination)
    dm "clone" <metadata> <DEST> <source> = dmrecover-<session>-clone -> mount at MP

The kernel hydrates DEST: it copies every region not yet in DEST from the source, in the
background, and records each hydrated region in its own metadata. Reads of hydrated regions
never leave the kernel; application writes go to DEST directly (a write smaller than a region
first copies its region from the source). Nothing but the clone target writes DEST, so the
engine's own restored copy lives in a sparse staging file (`engine_dest`), which doubles as the
cache of fetched chunks for the regions the kernel copies.

Why the kernel and not the engine's restorer hydrates DEST: the clone target has no message
that marks a region hydrated, and a restorer writing restored data through the clone device
would race with the application's writes to the same region (it could overwrite a newer write
with the backup's data). The kernel's hydration is ordered with the application's I/O per
region, so it is the only safe writer of DEST.

Cutover: online (`online_cutover`): wait until every region is hydrated, then swap the table to
`linear` on DEST (loaded, then one resume: one short pause; no merge, no application stop,
ioctl.swap). Restart mode: after teardown, `finish_hydration()` re-creates the clone from
its metadata over the complete staging file and waits for the rest. After a crash the clone
is re-created from the same metadata: hydrated regions stay hydrated, application writes stay
in DEST. Until then the source waits (backends/dm/waitpath.py): the kernel's reads of it queue
while the session process is dead, so no write of the application fails for want of a source;
`dmrecover resume` serves it again (`serve_dead_source`) before it stops anything.

`DMRECOVER_FAIL_AT=<step>` (a test hook) injects a failure at: dm-probe, fuse, origin-loop,
source, clone-meta, meta-loop, dest-loop, dm-clone, mount. `DMRECOVER_TEST_MERGE_PAUSE=<s>`
holds the online cutover for s seconds with the linear table loaded, before the swap (a power
cut there).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dmrecover.backends.base import BackendContext, Presentation, UndoStack
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm import ioctl, waitpath
from dmrecover.backends.dm_clone import target
from dmrecover.backends.fuse.stack import start_server
from dmrecover.errors import StackError
from dmrecover.system import loops, lvm
from dmrecover.system.files import fsync_dir
from dmrecover.system.mounts import mount, umount
from dmrecover.testhooks import fault_point, merge_pause

if TYPE_CHECKING:  # annotations only
    from dmrecover.backends.fuse.server import FuseServer
    from dmrecover.engine.pseudovolume import PseudoVolume

log = logging.getLogger(__name__)

ORIGIN_SUBDIR = "origin"
ORIGIN_FILE = "volume"
META_FILE = "clone-meta.img"
STAGING_FILE = "staging.img"
LAYER = "clone"
HYDRATION_TIMEOUT = 24 * 3600.0


def staging_path(engine_dir: str) -> str:
    return os.path.join(engine_dir, STAGING_FILE)


def make_sparse(path: str, size: int) -> bool:
    """A sparse file of at least `size` bytes, 0600; returns True when it was created."""
    created = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    return created


def wait_hydrated(name: str, *, timeout: float = HYDRATION_TIMEOUT,
                  progress: Callable[[target.CloneStatus], None] | None = None
                  ) -> target.CloneStatus:
    """Wait until the clone device `name` has hydrated every region."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        st = target.status(name)
        if st.failed or st.needs_check or st.read_only_metadata:
            raise StackError(f"the clone {name} failed (status: {dm.status(name).strip()})",
                             hint="its metadata is kept; see the kernel log (dmesg)")
        if progress is not None:
            progress(st)
        if st.complete:
            return st
        if not st.hydration_enabled:
            target.enable_hydration(name)
        if time.monotonic() > deadline:
            raise StackError(f"the clone {name} did not finish hydrating within {timeout:g}s "
                             f"({st.hydrated}/{st.regions} regions)")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


@dataclass
class CloneStack(waitpath.SourceLayer, Presentation):
    """The dm-clone backend's presentation of a read-only PseudoVolume at a mount point."""

    volume: PseudoVolume  # read_only=True, its DEST is the staging file
    ctx: BackendContext
    undo: UndoStack = field(default_factory=UndoStack)
    server: FuseServer | None = None
    origin_loop: str | None = None
    source: str | None = None  # the waiting source over origin_loop (waitpath)
    meta_loop: str | None = None
    dest_loop: str | None = None  # DEST is a regular file
    clone: str | None = None  # dm name
    mounted: bool = False
    hydrate: bool = True  # enable hydration once the device is up
    origin_direct_io: bool = True  # see DmStack.origin_direct_io
    swaps: list[ioctl.Swap] = field(default_factory=list)  # the online cutover's swap

    @property
    def state_dir(self) -> str:
        return self.ctx.engine_dir

    @property
    def session(self) -> str:
        return self.ctx.session or os.path.basename(os.path.abspath(self.state_dir))

    @property
    def origin_dir(self) -> str:
        return os.path.join(self.state_dir, ORIGIN_SUBDIR)

    @property
    def meta_path(self) -> str:
        return os.path.join(self.state_dir, META_FILE)

    @property
    def clone_name(self) -> str:
        return dm.dm_name(self.session, LAYER)

    @property
    def device(self) -> str:
        return str(dm.mapper_path(self.clone_name))

    def devices(self) -> dict:
        return {"backend": "dm-clone", "fuse_dir": self.origin_dir if self.server else None,
                "origin_loop": self.origin_loop, "source": self.source,
                "meta_loop": self.meta_loop,
                "metadata": self.meta_path, "dest_loop": self.dest_loop, "dm": self.clone,
                "swaps": [s.as_dict() for s in self.swaps],
                "mounted": self.ctx.mountpoint if self.mounted else None}

    def stats(self) -> dict:
        """Hydration progress (CloneStatus.as_dict), or {} while the device is not up."""
        if self.clone is None:
            return {}
        try:
            return target.status(self.clone).as_dict()
        except StackError as err:
            log.warning("clone status: %s", err)
            return {}

    def _changed(self) -> None:
        if self.ctx.on_change is not None:
            self.ctx.on_change(self.devices())

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        """source -> metadata -> DEST -> dm clone -> mount; undone on failure."""
        try:
            fault_point("dm-probe")
            dm.probe((target.TARGET, waitpath.TARGET))
            self._check_engine_dest()
            dm.install_udev_rules()
            self._start_origin()
            self._attach_origin()
            self._make_source()
            self._make_metadata()
            self._attach_metadata()
            self._attach_dest()
            self._create_clone()
            self._mount()
        except BaseException:
            errors = self.undo.unwind()
            self._changed()
            if errors:
                log.error("undo after a failed set-up left problems: %s", "; ".join(errors))
            raise

    def _check_engine_dest(self) -> None:
        """The clone target must be DEST's only writer: refuse an engine that writes DEST."""
        engine_dest = getattr(self.volume.fetcher, "dest_path", None)
        if engine_dest is None:
            return
        try:
            a, b = os.stat(engine_dest), os.stat(self.ctx.dest)
        except OSError:
            return
        same = (a.st_rdev == b.st_rdev) if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode) \
            else (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        if same:
            raise StackError("on the dm-clone backend the engine must not write DEST",
                             hint="open the volume on Backend.engine_dest() (the staging file)")

    def _start_origin(self) -> None:
        fault_point("fuse")
        os.makedirs(self.origin_dir, mode=0o700, exist_ok=True)
        self.server = start_server(self.volume, self.origin_dir, ORIGIN_FILE, read_only=True)
        self.undo.push("fuse", self._stop_origin)
        self._changed()

    def _stop_origin(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        self._changed()

    def _attach_origin(self) -> None:
        fault_point("origin-loop")
        self.origin_loop = loops.attach(os.path.join(self.origin_dir, ORIGIN_FILE),
                                        read_only=True, direct_io=self.origin_direct_io)
        self.undo.push("origin-loop", self._detach("origin_loop"))
        self._changed()

    def _detach(self, attr: str) -> Callable[[], None]:
        def undo() -> None:
            dev = getattr(self, attr)
            setattr(self, attr, None)
            if dev is not None:
                loops.detach(dev)
            self._changed()
        return undo

    def _make_metadata(self) -> None:
        """A sparse metadata file (all zeroes: the target formats it); an existing one is
        kept: it records what is hydrated (a resumed session)."""
        fault_point("clone-meta")
        if os.path.islink(self.meta_path):  # --overlay VG: the metadata is the session's LV
            lvm.device_for(self.meta_path, target.metadata_size(self.volume.size), "metadata")
            return
        if make_sparse(self.meta_path, target.metadata_size(self.volume.size)):
            self.undo.push("clone-meta", lambda: os.unlink(self.meta_path))

    def _attach_metadata(self) -> None:
        fault_point("meta-loop")
        if os.path.islink(self.meta_path):  # an LV: used directly, no loop
            self.meta_loop = os.path.realpath(self.meta_path)
            self._changed()
            return
        self.meta_loop = loops.attach(self.meta_path)
        self.undo.push("meta-loop", self._detach("meta_loop"))
        self._changed()

    def _dest_device(self) -> str:
        if stat.S_ISBLK(os.stat(self.ctx.dest).st_mode):
            return self.ctx.dest
        assert self.dest_loop is not None
        return self.dest_loop

    def _attach_dest(self) -> None:
        fault_point("dest-loop")
        st = os.stat(self.ctx.dest)
        if stat.S_ISBLK(st.st_mode):
            return
        if st.st_size < self.volume.size:
            raise StackError(f"DEST {self.ctx.dest} is smaller than the volume "
                             f"({st.st_size} < {self.volume.size} bytes)")
        self.dest_loop = loops.attach(self.ctx.dest)
        self.undo.push("dest-loop", self._detach_dest_loop)
        self._changed()

    def _detach_dest_loop(self) -> None:
        """Undo of dest-loop: once the clone holds the loop it is autoclear (see
        _create_clone) and may be gone already, its number reused: detach it only while it
        still serves DEST."""
        dev, self.dest_loop = self.dest_loop, None
        backing = loops.backing_file(dev) if dev is not None else None
        if backing and os.path.realpath(backing) == os.path.realpath(self.ctx.dest):
            loops.detach(dev)
        self._changed()

    def _create_clone(self) -> None:
        fault_point("dm-clone")
        name = self.clone_name
        if dm.info(name) is not None:
            raise StackError(f"device-mapper device {name} exists already",
                             hint="a dead session left it: run `dmrecover cleanup`")
        assert self.meta_loop and self.source
        table = target.clone_table(self.meta_loop, self._dest_device(),
                                   str(dm.mapper_path(self.source)), self.volume.size)
        dm.create(name, table, dm.dm_uuid(self.session, LAYER))
        self.clone = name
        self.undo.push("dm-clone", self._remove_clone)
        if self.dest_loop is not None:
            # The clone holds the DEST loop now: detaching it only sets autoclear, so it goes
            # with the clone. `dmrecover cleanup` after a SIGKILL finds the session's dm
            # devices and the loops on files under its state dir, not a DEST file elsewhere.
            loops.detach(self.dest_loop, wait=0)
        self._changed()
        st = target.status(name)
        if st.failed or st.needs_check:
            raise StackError(f"the clone {name} came up failed (metadata {self.meta_path})",
                             hint="see the kernel log (dmesg)")
        if self.hydrate:
            target.enable_hydration(name)

    def _remove_clone(self) -> None:
        name, self.clone = self.clone, None
        if name is not None:
            dm.remove(name)
        self._changed()

    def _mount(self) -> None:
        fault_point("mount")
        mount(self.device, self.ctx.mountpoint, self.ctx.fstype, list(self.ctx.mount_options))
        self.mounted = True
        self.undo.push("mount", self._umount)
        self._changed()

    def _umount(self) -> None:
        umount(self.ctx.mountpoint)
        self.mounted = False
        self._changed()

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> list[str]:
        """Unmount (StackError while held, stack intact), remove the clone (its metadata is
        committed on removal), detach, stop FUSE. The metadata file stays: it says which
        regions of DEST hold data."""
        if "mount" in self.undo.names():
            self.undo.pop("mount")()
        try:
            self.undo.pop("clone-meta")
        except KeyError:
            pass
        return self.undo.unwind()

    # ------------------------------------------------------------------ online cutover

    def online_cutover(self, dest: str, *, on_phase: Callable[[str], None] | None = None,
                       timeout: float = HYDRATION_TIMEOUT) -> float:
        """Wait for the last regions to hydrate, then swap the table to `linear` on DEST under
        the running application; returns the I/O pause in seconds. The source (FUSE, loop)
        and the metadata loop are gone afterwards; the device stays mounted."""
        if self.clone is None:
            raise StackError("online cutover needs the dm-clone device to be up")
        phase = on_phase or (lambda _p: None)
        phase("hydrate")
        wait_hydrated(self.clone, timeout=timeout)
        phase("reload-linear")
        dest_dev = self._dest_device()

        def loaded() -> None:
            pause_for_test = merge_pause()  # a test cuts the power with the new table loaded
            if pause_for_test:
                time.sleep(pause_for_test)

        # Loaded first, then one resume swaps it in (the kernel suspends, swaps, resumes).
        done = ioctl.swap(self.clone, dm.linear_table(dest_dev, self.volume.size),
                          suspend_first=False, loaded=loaded)
        self.swaps.append(done)
        pause = done.pause
        for step in ("source", "origin-loop", "fuse", "meta-loop"):
            try:
                self.undo.pop(step)()
            except KeyError:
                pass
        if self.dest_loop is not None:
            # The linear table holds the DEST loop: detaching it now only sets autoclear, so it
            # goes when the device is removed.
            loops.detach(self.dest_loop, wait=0)
        self._changed()
        return pause
