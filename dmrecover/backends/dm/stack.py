"""The device-mapper backend's stack, with an undo list (same interface as stack.FuseStack).

    PseudoVolume(read_only) -> FUSE file STATE/origin/volume -> losetup -r  (origin)
    sparse file STATE/cow.img -> losetup                                      (COW)
    dm "snapshot" <origin> <cow> P 8  = dmrecover-<session>-pseudo            (pseudo-volume)
    -> mount at MP

The kernel keeps the application's writes (the COW, a persistent exception store with 4 KiB
chunks); the Python engine only serves the origin: restored chunks from DEST, else fetched,
written to DEST and served (copy-on-read). Why loop over FUSE rather than NBD: see
docs/architecture.md ("dm backend: the origin").

Cutover:
- restart mode: the session stops the application and calls `teardown()` (unmount, remove the
  snapshot, detach, stop FUSE), then `merge_into_dest()` merges the COW into DEST with a
  `snapshot-merge` device, waits until it is merged, removes it; the session mounts DEST.
- online mode: `online_cutover()` reloads the mounted pseudo-volume's table in place as
  `snapshot-merge <DEST> <cow>` (suspend, reload, resume: the application keeps running), tears
  the origin (loop, FUSE) down, waits for the merge, then reloads it as `linear` on DEST.

Each step pushes its undo on an `UndoStack`; a failure at step N unwinds N-1..1 so that no dm
device, loop, mount or FUSE mount is left behind. `DMRECOVER_FAIL_AT=<step>` injects a failure
(steps: dm-probe, fuse, origin-loop, cow, cow-loop, dm-pseudo, mount).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.fuse.stack import UndoStack, attach_loop, detach_loop, fault_point
from dmrecover.errors import StackError
from dmrecover.system import command
from dmrecover.system.mounts import mount, umount

log = logging.getLogger(__name__)

ORIGIN_SUBDIR = "origin"
ORIGIN_FILE = "volume"
COW_FILE = "cow.img"
CHUNK_SECTORS = 8  # 4 KiB: a small write never copies more than 4 KiB from the origin
MERGE_TIMEOUT = 24 * 3600.0
MERGE_PAUSE_ENV = "DMRECOVER_TEST_MERGE_PAUSE"


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


def _fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def flush_block_cache(dev: str) -> None:
    """Write back and drop a block device's page cache (BLKFLSBUF).

    The engine writes DEST through its page cache while dm writes DEST underneath it: after
    a merge the cached pages would be stale for whoever reads DEST through its node next.
    """
    if stat.S_ISBLK(os.stat(dev).st_mode):
        command.run(["blockdev", "--flushbufs", dev], error=StackError,
                    what=f"flushing the cache of {dev}")


@dataclass
class DmStack:
    """The dm backend's presentation of a read-only PseudoVolume at a mount point."""

    volume: object  # PseudoVolume, read_only=True
    state_dir: str
    mountpoint: str
    fstype: str | None
    mount_options: list[str] = field(default_factory=list)
    session: str = ""
    undo: UndoStack = field(default_factory=UndoStack)
    on_change: Callable[[dict], None] | None = None
    server: object | None = None  # FuseServer
    origin_loop: str | None = None
    cow_loop: str | None = None
    pseudo: str | None = None  # dm name
    dest_loop: str | None = None  # loop on DEST (a regular file) during an online merge
    mounted: bool = False

    def __post_init__(self) -> None:
        if not self.session:
            self.session = os.path.basename(os.path.abspath(self.state_dir))

    # ------------------------------------------------------------------ paths

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
                "origin_loop": self.origin_loop, "cow_loop": self.cow_loop,
                "cow": self.cow_path, "dm": self.pseudo, "dest_loop": self.dest_loop,
                "mounted": self.mountpoint if self.mounted else None}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.devices())

    # ------------------------------------------------------------------ build

    def build(self) -> None:
        """origin (FUSE, loop -r) -> COW (file, loop) -> dm snapshot -> mount; undone on failure."""
        try:
            fault_point("dm-probe")
            dm.probe(("snapshot",))
            dm.install_udev_rules()
            self._start_origin()
            self._attach_origin()
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
        from dmrecover.backends.fuse.server import FuseServer

        fault_point("fuse")
        os.makedirs(self.origin_dir, exist_ok=True)
        server = FuseServer(self.volume, self.origin_dir, name=ORIGIN_FILE, read_only=True)
        server.start()
        self.server = server
        self.undo.push("fuse", self._stop_origin)
        self._changed()

    def _stop_origin(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        self._changed()

    def _attach_origin(self) -> None:
        fault_point("origin-loop")
        self.origin_loop = attach_loop_ro(os.path.join(self.origin_dir, ORIGIN_FILE))
        self.undo.push("origin-loop", self._detach_origin)
        self._changed()

    def _detach_origin(self) -> None:
        dev, self.origin_loop = self.origin_loop, None
        if dev is not None:
            detach_loop(dev)
        self._changed()

    def _make_cow(self) -> None:
        """A sparse COW file; an existing one is kept (a resumed session's writes are in it)."""
        fault_point("cow")
        size = cow_size(self.volume.size)
        created = not os.path.exists(self.cow_path)
        fd = os.open(self.cow_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            dfd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            # A failed first set-up leaves no empty COW behind; a resumed one keeps its data.
            self.undo.push("cow", lambda: os.unlink(self.cow_path))

    def _attach_cow(self) -> None:
        fault_point("cow-loop")
        self.cow_loop = attach_loop(self.cow_path)
        self.undo.push("cow-loop", self._detach_cow)
        self._changed()

    def _detach_cow(self) -> None:
        dev, self.cow_loop = self.cow_loop, None
        if dev is not None:
            detach_loop(dev)
        self._changed()

    def _create_pseudo(self) -> None:
        fault_point("dm-pseudo")
        name = self.pseudo_name
        if dm.info(name) is not None:
            raise StackError(f"device-mapper device {name} exists already",
                             hint="a dead session left it: run `dmrecover cleanup`")
        assert self.origin_loop and self.cow_loop
        table = dm.snapshot_table(self.origin_loop, self.cow_loop, self.volume.size,
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
        mount(self.device, self.mountpoint, self.fstype, self.mount_options)
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

    def cow_usage(self) -> dict:
        """Sectors allocated in the COW and its capacity (for status)."""
        if self.pseudo is None:
            return {}
        try:
            st = dm.snapshot_status(self.pseudo)
        except StackError as err:
            return {"error": str(err)}
        return {"cow_allocated_sectors": st.allocated, "cow_total_sectors": st.total,
                "cow_metadata_sectors": st.metadata, "cow_invalid": st.invalid}

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
        dest_dev = self._dest_device(dest)
        self.volume.fetcher.sync_dest()
        flush_block_cache(dest_dev)
        phase("reload-merge")
        pause = self._swap(dm.snapshot_merge_table(dest_dev, self.cow_loop, size,
                                                   CHUNK_SECTORS), suspend_first=True)
        # The origin is no longer used by any table: take it down now.
        for step in ("origin-loop", "fuse"):
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
            # Autoclear: the DEST loop goes away by itself when the pseudo-volume is removed.
            from dmrecover.system.blockdev import loop_detach

            loop_detach(self.dest_loop)
        self._changed()
        return pause

    def _swap(self, table: str, *, suspend_first: bool) -> float:
        """Replace the live table; returns how long I/O was suspended.

        suspend_first: a table whose constructor reads the COW (snapshot-merge on another
        origin gets no exception handover) must be loaded while the old snapshot is quiesced;
        a linear table can be loaded before, which keeps the pause shorter.
        """
        assert self.pseudo is not None
        if not suspend_first:
            dm.reload(self.pseudo, table)
        t0 = time.monotonic()
        dm.suspend(self.pseudo)
        try:
            if suspend_first:
                dm.reload(self.pseudo, table)
        finally:
            dm.resume(self.pseudo, udev_wait=False)
        pause = time.monotonic() - t0
        # Let udev finish the change event before anything looks at the device again.
        if dm.use_udevsync():
            command.run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)
        return pause

    def _dest_device(self, dest: str) -> str:
        if stat.S_ISBLK(os.stat(dest).st_mode):
            return dest
        _fdatasync_path(dest)
        self.dest_loop = attach_loop(dest)
        self.undo.push("dest-loop", self._detach_dest)
        return self.dest_loop

    def _detach_dest(self) -> None:
        dev, self.dest_loop = self.dest_loop, None
        if dev is not None:
            detach_loop(dev)


def attach_loop_ro(path: str) -> str:
    """losetup --read-only: the origin is never written through the loop."""
    from dmrecover.system.blockdev import loop_attach

    return loop_attach(path, read_only=True)


def wait_merged(name: str, *, timeout: float = MERGE_TIMEOUT,
                progress: Callable[[dm.SnapshotStatus], None] | None = None) -> None:
    """Wait until a snapshot-merge device has merged everything (allocated == metadata)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        st = dm.snapshot_status(name)
        if st.invalid or st.merge_failed:
            raise StackError(f"the merge of {name} failed (status: {dm.status(name)})",
                             hint="the COW is kept; see the kernel log (dmesg)")
        if progress is not None:
            progress(st)
        if st.merged:
            return
        if time.monotonic() > deadline:
            raise StackError(f"the merge of {name} did not finish within {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def merge_into_dest(volume, state_dir: str, dest: str, session: str = "",
                    *, timeout: float = MERGE_TIMEOUT) -> int:
    """Restart-mode merge: DEST += COW, with the application stopped and nothing mounted.

    A `snapshot-merge <DEST> <cow>` device is created, left to merge, then removed; the COW's
    own metadata records each merged chunk, so after a crash this runs again and continues.
    Then the "merged" marker is written (durably) and the COW file removed. Returns the COW's
    allocated bytes before the merge. Idempotent.
    """
    from dmrecover.engine.pseudovolume import MERGED_MARKER, _write_marker

    session = session or os.path.basename(os.path.abspath(state_dir))
    cow = os.path.join(state_dir, COW_FILE)
    marker = os.path.join(state_dir, MERGED_MARKER)
    if os.path.exists(marker):
        return 0
    undo = UndoStack()
    merged_bytes = 0
    try:
        if os.path.exists(cow):
            volume.fetcher.sync_dest()
            if stat.S_ISBLK(os.stat(dest).st_mode):
                dest_dev = dest
            else:
                _fdatasync_path(dest)
                dest_dev = attach_loop(dest)
                undo.push("dest-loop", lambda: detach_loop(dest_dev))
            flush_block_cache(dest_dev)
            cow_loop = attach_loop(cow)
            undo.push("cow-loop", lambda: detach_loop(cow_loop))
            name = dm.dm_name(session, "merge")
            if dm.info(name) is not None:
                dm.remove(name)
            fault_point("dm-merge")
            dm.create(name, dm.snapshot_merge_table(dest_dev, cow_loop, volume.size,
                                                    CHUNK_SECTORS),
                      dm.dm_uuid(session, "merge"))
            undo.push("dm-merge", lambda: dm.remove(name))
            # Test knob: hold the merge phase open so a test can cut the power during it.
            time.sleep(float(os.environ.get(MERGE_PAUSE_ENV) or 0))
            st = dm.snapshot_status(name)
            merged_bytes = max(0, st.allocated - st.metadata) * dm.SECTOR
            wait_merged(name, timeout=timeout)
            undo.unwind()
            if stat.S_ISBLK(os.stat(dest).st_mode):
                flush_block_cache(dest)  # drop the engine's now stale cached pages of DEST
            _fdatasync_path(dest)
    except BaseException:
        errors = undo.unwind()
        if errors:
            log.error("undo after a failed merge left problems: %s", "; ".join(errors))
        raise
    _write_marker(Path(marker), f"{time.time():.3f}\n")
    try:
        os.unlink(cow)
    except FileNotFoundError:
        pass
    return merged_bytes


def discard_cow(state_dir: str) -> None:
    """Remove the COW file (only once merged)."""
    try:
        os.unlink(os.path.join(state_dir, COW_FILE))
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------- leftovers (cleanup)


def _loop_backing_file(major: int, minor: int) -> str | None:
    try:
        name = os.path.basename(os.readlink(f"/sys/dev/block/{major}:{minor}"))
    except OSError:
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def _session_state(info: dm.DmInfo) -> tuple[str | None, bool, str | None]:
    """(state dir, live, state) of the session owning a device, found by looking: the state
    dir holding the backing file of a loop under it, else the default state dir."""
    from dmrecover.session.cleanup import _session_dir_of
    from dmrecover.session.session import SESSION_FILE, lock_held, read_json, session_dir

    dirs: list[str] = []
    try:
        for major, minor in dm.dependencies(info.name):
            backing = _loop_backing_file(major, minor)
            d = _session_dir_of(backing) if backing else None
            if d:
                dirs.append(d)
    except StackError:
        pass
    parts = dm.split_uuid(info.uuid)
    if not dirs and parts:
        d = session_dir(parts[0])
        if os.path.isfile(os.path.join(d, SESSION_FILE)):
            dirs.append(d)
    for d in dirs:
        if lock_held(d):
            return d, True, None
    if not dirs:
        return None, False, None
    try:
        data = read_json(os.path.join(dirs[0], SESSION_FILE)) or {}
    except Exception:
        data = {}
    return dirs[0], False, data.get("state")


def leftover_devices(session: str | None = None) -> list[str]:
    """dmrecover's dm devices that no live session owns, in removal order (top first).

    Left alone: devices of a live session, and the pseudo-volume of a finished online cutover
    (a `linear` mapping on DEST that the application runs on).
    """
    found = []
    for inf in dm.list_owned(session):
        _, live, state = _session_state(inf)
        if live:
            continue
        if state == "done":
            try:
                if dm.table(inf.name).split()[2:3] == ["linear"]:
                    continue
            except StackError:
                pass
        found.append(inf)
    # Top layers (opened by nothing of ours) first: fewer open references first.
    return [i.name for i in sorted(found, key=lambda i: i.open_count)]


def mounts_of_devices(names: list[str]) -> list[str]:
    """Mount points whose source is one of these dm devices, deepest first."""
    from dmrecover.system.mounts import mounts

    wanted = set()
    for n in names:
        wanted.add(str(dm.mapper_path(n)))
        inf = dm.info(n)
        if inf is not None:
            wanted.add(str(inf.devnode))
    return [m.target for m in reversed(mounts()) if m.source in wanted]


def remove_leftover(name: str) -> None:
    """Remove one leftover device (resumed first if a crash left it suspended)."""
    inf = dm.info(name)
    if inf is None:
        return
    if inf.suspended:
        dm.resume(name)
    dm.remove(name)


def teardown_session_devices(session: str) -> list[str]:
    """A dead session's dm part: unmount what is mounted from its devices, remove them."""
    done = []
    names = [i.name for i in dm.list_owned(session)] if dm.available() else []
    for mp in mounts_of_devices(names):
        try:
            umount(mp, check_holders=False, retries=3)
            done.append(f"unmounted {mp}")
        except StackError:
            umount(mp, lazy=True)
            done.append(f"lazily unmounted {mp}")
    if names:
        done += [f"removed dm device {n}" for n in dm.remove_owned(session)]
    return done
