"""The portable backend's stack, with an explicit undo list.

    PseudoVolume -> FUSE file STATE/fuse/volume -> losetup (direct I/O, no partition scan)
    -> mount at MP

Each step that succeeds pushes its undo onto an `UndoStack`; a failure at step N unwinds N-1..1,
so no mount, loop, FUSE mount or process is left behind. `DMRECOVER_FAIL_AT=<step>` (a test
hook, see dmrecover.testhooks) makes the named step fail before it acts, to prove that
(steps: fuse, loop, mount).

`teardown_leftovers()` removes what a dead session process left (found by looking, not by
trusting recorded names): mounts of our loops, loops whose backing file is under the state dir,
and the FUSE mount in the state dir. The dm backend uses it too: its origin is a FUSE file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dmrecover.backends.base import BackendContext, Presentation, UndoStack
from dmrecover.backends.fuse.server import FuseServer
from dmrecover.errors import StackError
from dmrecover.system import loops
from dmrecover.system.mounts import fuse_unmount, mount, mount_at, mounts, umount, umount_or_detach
from dmrecover.system.sysfs import xfs_stop_retrying
from dmrecover.testhooks import fault_point

if TYPE_CHECKING:  # annotations only
    from dmrecover.engine.pseudovolume import PseudoVolume

log = logging.getLogger(__name__)

FUSE_SUBDIR = "fuse"
FUSE_FILE = "volume"
DETACH_WAIT = 60.0  # seconds the loop may take to let go of the FUSE file after a detach


# session/cleanup.py still imports this name; it goes when cleanup iterates the registry.
detach_loop = loops.detach


# ---------------------------------------------------------------- the portable stack


@dataclass
class FuseStack(Presentation):
    """The portable backend's presentation of a PseudoVolume at a mount point."""

    volume: PseudoVolume
    ctx: BackendContext
    undo: UndoStack = field(default_factory=UndoStack)
    server: FuseServer | None = None
    loop: str | None = None
    #: The loop reads and writes its FUSE file with O_DIRECT: one FUSE request per block
    #: request, several in flight. Buffered, Debian 12's loop (Linux 6.1) reads its file page
    #: by page, each 4 KiB a round trip into Python, one at a time: 1 MiB sequential reads
    #: of restored data ran at 1 IOPS, 185 with direct I/O (bench_dm.py, fuse column, the
    #: VM). Newer loops (6.18 here) read buffered files well: reads are even, 4 KiB writes
    #: lose about a quarter with direct I/O (bench_fio.py vs --loop-buffered); the old
    #: kernel's 185-fold loss decides. Durability is the same: the FUSE file is direct_io
    #: already, so a write is acknowledged when the server has it in the overlay either way,
    #: and a flush is the same fsync.
    loop_direct_io: bool = True

    @property
    def fuse_dir(self) -> str:
        return os.path.join(self.ctx.state_dir, FUSE_SUBDIR)

    @property
    def mountpoint(self) -> str:
        return self.ctx.mountpoint

    def devices(self) -> dict:
        return {"fuse_dir": self.fuse_dir if self.server is not None else None,
                "loop": self.loop,
                "mounted": self.mountpoint if "mount" in self.undo.names() else None}

    def _changed(self) -> None:
        # Persists device names as they appear (the session record), for a later crash.
        if self.ctx.on_change is not None:
            self.ctx.on_change(self.devices())

    def build(self) -> None:
        """FUSE -> loop -> mount; on failure undo what was done and re-raise."""
        try:
            self._start_fuse()
            self._attach_loop()
            self._mount()
        except BaseException:
            errors = self.undo.unwind()
            self.server = None
            self.loop = None
            self._changed()
            if errors:
                log.error("undo after a failed set-up left problems: %s", "; ".join(errors))
            raise

    def _start_fuse(self) -> None:
        fault_point("fuse")
        os.makedirs(self.fuse_dir, exist_ok=True)
        server = start_server(self.volume, self.fuse_dir, FUSE_FILE)
        self.server = server
        self.undo.push("fuse", self._stop_fuse)
        self._changed()

    def _stop_fuse(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        self._changed()

    def _attach_loop(self) -> None:
        fault_point("loop")
        self.loop = loops.attach(os.path.join(self.fuse_dir, FUSE_FILE),
                                 direct_io=self.loop_direct_io)
        self.undo.push("loop", self._detach_loop)
        self._changed()

    def _detach_loop(self) -> None:
        dev, self.loop = self.loop, None
        if dev is not None:
            # The kernel lets go of the file only on the device's last close, which may come
            # late on a loaded host (udev probing it after the unmount); the FUSE server under
            # it must not stop before that (its reads would fail), so wait longer than usual.
            loops.detach(dev, wait=DETACH_WAIT)
        self._changed()

    def _mount(self) -> None:
        fault_point("mount")
        assert self.loop
        mount(self.loop, self.mountpoint, self.ctx.fstype, list(self.ctx.mount_options))
        self.undo.push("mount", self._umount)
        self._changed()

    def _umount(self) -> None:
        umount(self.mountpoint)
        self._changed()

    def teardown(self) -> list[str]:
        """Unmount (refusing while processes hold the mount: StackError), detach, stop FUSE."""
        if "mount" in self.undo.names():
            self.undo.pop("mount")()  # raises while held: the stack stays intact
        return self.undo.unwind()


def start_server(volume: PseudoVolume, mountdir: str, name: str, *,
                 read_only: bool = False) -> FuseServer:
    """Serve `volume` as mountdir/name (started: the file answers when this returns)."""
    server = FuseServer(volume, mountdir, name=name, read_only=read_only)
    server.start()
    return server


def teardown_leftovers(state_dir: str, fuse_dir: str | None = None) -> list[str]:
    """Remove the stack a dead session left: returns what was done (for the log).

    An XFS on those loops is told to stop retrying failed writes (sysfs.xfs_stop_retrying).
    Mounts of loops backed by files under state_dir (normally just MP) are unmounted (lazily if
    a normal unmount fails: on a dead FUSE server its I/O errors), those loops are detached,
    and the FUSE mount at fuse_dir (default: state_dir/fuse) is unmounted (lazily if still
    busy). MP is not looked at by name: it may hold something else by now.
    """
    done = []
    state_dir = os.path.abspath(state_dir)
    fuse_dir = os.path.abspath(fuse_dir or os.path.join(state_dir, FUSE_SUBDIR))
    ours = {dev for dev, _ in loops.loops_backed_under(state_dir)}
    # An XFS on a dead server's loop would retry its failed writes for ever: a mount caught
    # in log recovery (not in mountinfo yet) never ends, and sync(2) hangs behind it.
    for dev in sorted(ours):
        if xfs_stop_retrying(dev):
            done.append(f"made the XFS on {dev} give up its failed writes")
    # Mounts of our loops, anywhere (normally just MP), topmost first.
    for m in reversed(mounts()):
        if m.source in ours:
            lazily = umount_or_detach(m.target)
            done.append(f"{'lazily ' if lazily else ''}unmounted {m.target}")
    for dev in sorted(ours):
        try:
            loops.detach(dev)
            done.append(f"detached {dev}")
        except StackError as err:
            log.warning("detaching %s failed: %s", dev, err)
    while mount_at(fuse_dir) is not None:
        try:
            fuse_unmount(fuse_dir)
            done.append(f"unmounted FUSE {fuse_dir}")
        except StackError:
            fuse_unmount(fuse_dir, lazy=True)
            done.append(f"lazily unmounted FUSE {fuse_dir}")
    return done
