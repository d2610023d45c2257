"""The device-mapper backend's stack: build, teardown and online cutover, with an undo list.

    PseudoVolume(read_only) -> FUSE file STATE/origin/volume -> losetup -r  (origin loop)
    dm multipath, queue_if_no_path, over the origin loop
                                      = dmrecover-<session>-source            (source)
    DEST (a block device, or losetup -r on a file)                            (DEST)
    dm "linear" segments: restored runs on DEST, the rest on the source
                                      = dmrecover-<session>-origin            (origin)
    sparse file STATE/cow.img -> losetup                                      (COW)
    dm "snapshot" <origin> <cow> P 8  = dmrecover-<session>-pseudo            (pseudo-volume)
    -> mount at MP

The origin device's table follows the persisted restored map (origin.py): reads of restored
chunks never leave the kernel; once every chunk is restored it is one linear on DEST, and
the FUSE origin stays up, idle, until the cutover takes it down.

The kernel keeps the application's writes (the COW, a persistent exception store with 4 KiB
chunks); the Python engine only serves the origin: restored chunks from DEST, else fetched,
written to DEST and served (copy-on-read). Why loop over FUSE rather than NBD: see
docs/architecture.md ("dm backend: the origin"). The source waits while no session process
serves it (waitpath.py): a write smaller than a COW chunk copies its chunk from the origin,
and one failed copy invalidates the snapshot, the application's writes with it.

Cutover:
- restart mode: the session stops the application and calls `teardown()` (unmount, remove the
  snapshot, detach, stop FUSE), then `merge.merge_into_dest()` merges the COW into DEST with a
  `snapshot-merge` device, waits until it is merged, removes it; the session mounts DEST.
- online mode: `online_cutover()` swaps the mounted pseudo-volume's table in place to
  `snapshot-merge <DEST> <cow>` (suspend, load, resume, in-process ioctls: the application
  keeps running), tears the origin (loop, FUSE) down, waits for the merge, then swaps it to
  `linear` on DEST (loaded first, one resume). Both through ioctl.swap().

Each step pushes its undo on an `UndoStack`; a failure at step N unwinds N-1..1 so that no dm
device, loop, mount or FUSE mount is left behind. `DMRECOVER_FAIL_AT=<step>` (a test hook, see
dmrecover.testhooks) injects a failure (steps: dm-probe, fuse, origin-loop, source, cow,
cow-loop, dm-origin, dm-pseudo, mount; dm-merge in merge.py).
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
from dmrecover.backends.dm.merge import (
    CHUNK_SECTORS,
    COW_FILE,
    MERGE_TIMEOUT,
    fdatasync_path,
    flush_block_cache,
    wait_merged,
)
from dmrecover.backends.dm.origin import OriginReloader
from dmrecover.backends.fuse.stack import start_server
from dmrecover.engine.fetcher import MARK_SIZE
from dmrecover.errors import StackError
from dmrecover.system import loops, lvm
from dmrecover.system.files import fsync_dir
from dmrecover.system.mounts import mount, umount
from dmrecover.testhooks import fault_point

if TYPE_CHECKING:  # annotations only
    from dmrecover.backends.fuse.server import FuseServer
    from dmrecover.engine.pseudovolume import PseudoVolume

log = logging.getLogger(__name__)

ORIGIN_SUBDIR = "origin"
ORIGIN_FILE = "volume"


def cow_size(volume_size: int) -> int:
    """Size of the sparse COW file: the whole volume plus the exception store's metadata.

    A full persistent COW invalidates the snapshot for good, so the COW can hold every chunk of
    the volume: one 16-byte exception per 4 KiB chunk (256 per metadata chunk), a header chunk,
    and slack. Sparse: only what the application writes takes space.
    """
    chunks = -(-volume_size // 4096)
    metadata = (-(-chunks // 256) + 2) * 4096
    size = volume_size + metadata + (1 << 20)
    return -(-size // 4096) * 4096


@dataclass
class DmStack(waitpath.SourceLayer, Presentation):
    """The dm backend's presentation of a read-only PseudoVolume at a mount point.

    Its files (origin FUSE mount, COW) live in the engine dir, beside the engine's own.
    """

    volume: PseudoVolume  # read_only=True: the kernel takes the writes
    ctx: BackendContext
    undo: UndoStack = field(default_factory=UndoStack)
    server: FuseServer | None = None
    origin_loop: str | None = None
    source: str | None = None  # the waiting source over origin_loop (waitpath)
    cow_loop: str | None = None
    pseudo: str | None = None  # dm name
    dest_loop: str | None = None  # loop on DEST (a regular file) during an online merge
    origin_dm: str | None = None  # dm name of the origin (linear segments: DEST or FUSE)
    origin_dest: str | None = None  # DEST as the origin reads it (its device, or a loop -r)
    reloader: OriginReloader | None = None
    _origin_dest_fd: int = -1  # holds the DEST loop open (see _create_origin)
    mounted: bool = False
    #: The online cutover's table swaps (pause and its parts, when), for status and the bench.
    swaps: list[ioctl.Swap] = field(default_factory=list)
    #: The origin loop reads its FUSE file with O_DIRECT: one FUSE request per block request,
    #: many in flight (buffered, Linux 6.1's loop reads its file page by page, each 4 KiB a
    #: round trip into Python, one at a time: 0.22 vs 8.52 MB/s cold, bench/bench_dm.py
    #: --cold). The invalidated snapshot once seen with it in the 30 s outage test was not the
    #: loop's: a chunk whose open failed during the outage was reported missing when the
    #: repository came back before the check (fixed in LocalStorage.get); the many waiting
    #: requests of direct I/O only made that race likelier (docs/architecture.md, dm backend).
    origin_direct_io: bool = True

    # ------------------------------------------------------------------ paths

    @property
    def state_dir(self) -> str:
        return self.ctx.engine_dir

    @property
    def session(self) -> str:
        return self.ctx.session or os.path.basename(os.path.abspath(self.state_dir))

    @property
    def mountpoint(self) -> str:
        return self.ctx.mountpoint

    @property
    def origin_dir(self) -> str:
        return os.path.join(self.state_dir, ORIGIN_SUBDIR)

    @property
    def cow_path(self) -> str:
        return os.path.join(self.state_dir, COW_FILE)

    @property
    def pseudo_name(self) -> str:
        return dm.dm_name(self.session, "pseudo")

    @property
    def device(self) -> str:
        """The pseudo-volume's block device (what is mounted)."""
        return str(dm.mapper_path(self.pseudo_name))

    def devices(self) -> dict:
        return {"backend": "dm", "fuse_dir": self.origin_dir if self.server else None,
                "origin_loop": self.origin_loop, "source": self.source,
                "cow_loop": self.cow_loop,
                "cow": self.cow_path, "dm": self.pseudo, "dest_loop": self.dest_loop,
                "origin_dm": self.origin_dm, "origin_dest": self.origin_dest,
                "origin_reloads": self.reloader.stats.as_dict() if self.reloader else None,
                "swaps": [s.as_dict() for s in self.swaps],
                "mounted": self.mountpoint if self.mounted else None}

    def _changed(self) -> None:
        # Persists device names as they appear (the session record), for a later crash.
        if self.ctx.on_change is not None:
            self.ctx.on_change(self.devices())

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        """origin (FUSE, loop -r) -> COW (file, loop) -> dm snapshot -> mount; undone on failure."""
        try:
            fault_point("dm-probe")
            dm.probe(("snapshot", waitpath.TARGET))
            dm.install_udev_rules()
            self._start_origin()
            self._attach_origin()
            self._make_source()
            self._create_origin()
            self._make_cow()
            self._attach_cow()
            self._create_pseudo()
            self._mount()
        except BaseException:
            errors = self.undo.unwind()
            self._changed()
            if errors:
                log.error("undo after a failed set-up left problems: %s", "; ".join(errors))
            raise

    def _start_origin(self) -> None:
        fault_point("fuse")
        os.makedirs(self.origin_dir, exist_ok=True)
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
        # --read-only: the origin is never written through the loop.
        self.origin_loop = loops.attach(os.path.join(self.origin_dir, ORIGIN_FILE),
                                        read_only=True, direct_io=self.origin_direct_io)
        self.undo.push("origin-loop", self._detach_origin)
        self._changed()

    def _detach_origin(self) -> None:
        dev, self.origin_loop = self.origin_loop, None
        if dev is not None:
            loops.detach(dev)
        self._changed()

    def _create_origin(self) -> None:
        """The origin dm device over DEST and the origin loop, its table from the persisted
        restored map, and the thread that reloads it as the restore advances (origin.py)."""
        fault_point("dm-origin")
        name = dm.dm_name(self.session, "origin")
        if dm.info(name) is not None:
            raise StackError(f"device-mapper device {name} exists already",
                             hint="a dead session left it: run `dmrecover cleanup`")
        assert self.source
        fetcher = self.volume.fetcher
        dest = fetcher.dest_path
        if stat.S_ISBLK(os.stat(dest).st_mode):
            self.origin_dest = dest
        else:
            # Read-only: the origin never writes DEST. Buffered: it reads through DEST's page
            # cache, the one the engine writes into.
            self.origin_dest = loops.attach(dest, read_only=True)
            self.undo.push("origin-dest-loop", self._detach_origin_dest)
            # Autoclear: this process holds the loop open and detaches it at once, so it
            # goes by itself at the last close: when this process ends (a crash too) if no
            # table uses it yet, else when the origin device goes (which cleanup removes).
            self._origin_dest_fd = os.open(self.origin_dest, os.O_RDONLY | os.O_CLOEXEC)
            loops.detach(self.origin_dest, wait=0)
        self._changed()

        def busy() -> bool:
            st = fetcher.stats()
            return bool(st["waiting_for_repository_since"] or st["repository_lost_since"])

        reloader = OriginReloader(
            name, map_path=str(fetcher.map_path), nbits=fetcher.source.chunk_count,
            chunk_size=fetcher.source.chunk_size, size=self.volume.size,
            dest=self.origin_dest, fuse=str(dm.mapper_path(self.source)),
            marked=lambda: fetcher.marked, head=MARK_SIZE,
            synced=lambda: fetcher.synced_at, busy=busy)
        dm.create(name, reloader.table(), dm.dm_uuid(self.session, "origin"), read_only=True)
        self.origin_dm = name
        self.undo.push("dm-origin", self._remove_origin)
        self.reloader = reloader
        reloader.start()
        self.undo.push("origin-reload", self._stop_reloader)
        self._changed()

    def _stop_reloader(self) -> None:
        if self.reloader is not None:
            self.reloader.stop()

    def _remove_origin(self) -> None:
        name, self.origin_dm = self.origin_dm, None
        if name is not None:
            dm.remove(name)
        self._changed()

    def _detach_origin_dest(self) -> None:
        """Let the DEST loop go (autoclear: at its last close, ours, once the origin device is
        gone) and wait for it, so that a loop number reused later is never detached."""
        dev, self.origin_dest = self.origin_dest, None
        fd, self._origin_dest_fd = self._origin_dest_fd, -1
        if fd >= 0:
            os.close(fd)
        if dev is None:
            return
        deadline = time.monotonic() + 10
        while loops.backing_file(dev) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if loops.backing_file(dev) is not None:
            loops.detach(dev)
        self._changed()

    @property
    def origin_device(self) -> str:
        """What the snapshot reads as its origin."""
        assert self.origin_dm is not None
        return str(dm.mapper_path(self.origin_dm))

    def _make_cow(self) -> None:
        """A sparse COW file; an existing one is kept (a resumed session's writes are in it)."""
        fault_point("cow")
        size = cow_size(self.volume.size)
        if os.path.islink(self.cow_path):  # --overlay VG: the COW is an LV of the session's
            lvm.device_for(self.cow_path, size, "COW")
            return
        created = not os.path.exists(self.cow_path)
        fd = os.open(self.cow_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.state_dir)
            # A failed first set-up leaves no empty COW behind; a resumed one keeps its data.
            self.undo.push("cow", lambda: os.unlink(self.cow_path))

    def _attach_cow(self) -> None:
        fault_point("cow-loop")
        if os.path.islink(self.cow_path):
            # An LV: the snapshot uses it directly (no loop to detach, nothing to undo).
            self.cow_loop = os.path.realpath(self.cow_path)
            self._changed()
            return
        self.cow_loop = loops.attach(self.cow_path)
        self.undo.push("cow-loop", self._detach_cow)
        self._changed()

    def _detach_cow(self) -> None:
        dev, self.cow_loop = self.cow_loop, None
        if dev is not None:
            loops.detach(dev)
        self._changed()

    def _create_pseudo(self) -> None:
        fault_point("dm-pseudo")
        name = self.pseudo_name
        if dm.info(name) is not None:
            raise StackError(f"device-mapper device {name} exists already",
                             hint="a dead session left it: run `dmrecover cleanup`")
        assert self.origin_dm and self.cow_loop
        table = dm.snapshot_table(self.origin_device, self.cow_loop, self.volume.size,
                                  CHUNK_SECTORS)
        dm.create(name, table, dm.dm_uuid(self.session, "pseudo"))
        self.pseudo = name
        self.undo.push("dm-pseudo", self._remove_pseudo)
        self._changed()
        st = dm.snapshot_status(name)
        if st.invalid:
            raise StackError(f"the snapshot {name} is invalid (its COW {self.cow_path} is full "
                             "or was invalidated by an origin read error)")

    def _remove_pseudo(self) -> None:
        name, self.pseudo = self.pseudo, None
        if name is not None:
            dm.remove(name)
        self._changed()

    def _mount(self) -> None:
        fault_point("mount")
        mount(self.device, self.mountpoint, self.ctx.fstype, list(self.ctx.mount_options))
        self.mounted = True
        self.undo.push("mount", self._umount)
        self._changed()

    def _umount(self) -> None:
        umount(self.mountpoint)
        self.mounted = False
        self._changed()

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> list[str]:
        """Unmount (refusing while processes hold the mount: StackError, stack intact), then
        remove the snapshot, detach the loops, stop FUSE. The COW file stays (it holds the
        application's writes until they are merged)."""
        if "mount" in self.undo.names():
            self.undo.pop("mount")()
        # The COW file is data now: never unlink it on teardown.
        try:
            self.undo.pop("cow")
        except KeyError:
            pass
        return self.undo.unwind()

    # ------------------------------------------------------------------ online cutover

    def online_cutover(self, dest: str, *, on_phase: Callable[[str], None] | None = None,
                       timeout: float = MERGE_TIMEOUT) -> float:
        """Merge the COW into DEST under the running application; return the longest
        suspension in seconds.

        Needs the restore complete and DEST durable (the caller flushes the volume): the
        snapshot over the origin then shows exactly what a snapshot over DEST shows, so the
        table can be swapped in place. After it the pseudo-volume is `linear` on DEST, still
        mounted; origin, FUSE and COW loop are gone.
        """
        if self.pseudo is None or self.cow_loop is None:
            raise StackError("online cutover needs the dm pseudo-volume to be up")
        phase = on_phase or (lambda _p: None)
        size = self.volume.size
        # No origin reload from here on: the swap below must see the origin still.
        try:
            self.undo.pop("origin-reload")()
        except KeyError:
            pass
        dest_dev = self._dest_device(dest)
        self.volume.fetcher.sync_dest()
        flush_block_cache(dest_dev)
        phase("reload-merge")
        pause = self._swap(dm.snapshot_merge_table(dest_dev, self.cow_loop, size,
                                                   CHUNK_SECTORS), suspend_first=True)
        # The origin is no longer used by any table: take it down now, before the merge
        # writes DEST (the origin's read-only view of DEST must not outlive the swap).
        for step in ("dm-origin", "origin-dest-loop", "source", "origin-loop", "fuse"):
            try:
                self.undo.pop(step)()
            except KeyError:
                pass
        phase("merge")
        wait_merged(self.pseudo, timeout=timeout)
        phase("reload-linear")
        pause = max(pause, self._swap(dm.linear_table(dest_dev, size), suspend_first=False))
        # The COW is merged and unused: detach its loop.
        try:
            self.undo.pop("cow-loop")()
        except KeyError:
            pass
        if self.dest_loop is not None:
            # Autoclear: the DEST loop goes away by itself when the pseudo-volume is removed
            # (the table still holds it, so do not wait for it to go).
            loops.detach(self.dest_loop, wait=0)
        self._changed()
        return pause

    def _swap(self, table: str, *, suspend_first: bool) -> float:
        """Replace the live table in-process (ioctl.swap); returns how long I/O was paused.

        suspend_first: a table whose constructor reads the COW (snapshot-merge on another
        origin gets no exception handover) must be loaded while the old snapshot is quiesced;
        a linear table is loaded before, and one resume swaps it in (shorter pause).
        """
        assert self.pseudo is not None
        done = ioctl.swap(self.pseudo, table, suspend_first=suspend_first)
        self.swaps.append(done)
        return done.pause

    def _dest_device(self, dest: str) -> str:
        if stat.S_ISBLK(os.stat(dest).st_mode):
            return dest
        fdatasync_path(dest)
        self.dest_loop = loops.attach(dest)
        self.undo.push("dest-loop", self._detach_dest)
        return self.dest_loop

    def _detach_dest(self) -> None:
        dev, self.dest_loop = self.dest_loop, None
        if dev is not None:
            loops.detach(dev)
