"""Building and tearing down the device stack, with an explicit undo list.

Portable (fuse) backend:

    PseudoVolume -> FUSE file STATE/fuse/volume -> losetup (no partition scan) -> mount at MP

Each step that succeeds pushes its undo onto an `UndoStack`; a failure at step N unwinds N-1..1,
so no mount, loop, FUSE mount or process is left behind. `DMRECOVER_FAIL_AT=<step>` (a test
hook) makes the named step fail before it acts, to prove that.

`teardown_leftovers()` removes what a dead session process left (found by looking, not by
trusting recorded names): the mount at MP if it sits on one of our loops, loops whose backing
file is under the state dir, and the FUSE mount in the state dir.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmrecover.errors import StackError
from dmrecover.system import command
from dmrecover.system.mounts import is_mountpoint, mount, mount_at, mounts, umount

log = logging.getLogger(__name__)

FAULT_ENV = "DMRECOVER_FAIL_AT"
FUSE_SUBDIR = "fuse"
FUSE_FILE = "volume"


def fault_point(step: str) -> None:
    """Test hook: raise StackError when DMRECOVER_FAIL_AT names this step."""
    if os.environ.get(FAULT_ENV) == step:
        raise StackError(f"injected failure at step {step} ({FAULT_ENV})")


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


# ---------------------------------------------------------------- loops


def loops_backed_under(directory: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(loop device, backing file) for every loop whose backing file is under directory."""
    root = os.path.abspath(directory)
    found = []
    for loop in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        path = backing.removesuffix(" (deleted)")
        if path == root or path.startswith(root.rstrip("/") + "/"):
            found.append((f"/dev/{loop.name}", path))
    return found


def loop_backing(dev: str) -> str | None:
    """The backing file of loop device dev, or None when not attached."""
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def attach_loop(path: str) -> str:
    """losetup --find --show PATH (no partition scan: -P is never passed)."""
    from dmrecover.system.blockdev import loop_attach

    return loop_attach(path)


def detach_loop(dev: str, *, wait: float = 10.0) -> None:
    """Detach dev and wait until the kernel has let go of its backing file."""
    from dmrecover.system.blockdev import loop_detach

    if loop_backing(dev) is None:
        return
    loop_detach(dev)
    deadline = time.monotonic() + wait
    while loop_backing(dev) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def fuse_unmount(path: str, *, lazy: bool = False) -> None:
    """fusermount3 -u [-z] path (a no-op when nothing is mounted there)."""
    if not is_mountpoint(path):
        return
    argv = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    command.run(argv, error=StackError, what=f"unmounting the FUSE mount {path}")


# ---------------------------------------------------------------- the portable stack


@dataclass
class FuseStack:
    """The portable backend's presentation of a PseudoVolume at a mount point."""

    volume: object  # PseudoVolume
    state_dir: str
    mountpoint: str
    fstype: str | None
    mount_options: list[str] = field(default_factory=list)
    undo: UndoStack = field(default_factory=UndoStack)
    server: object | None = None  # FuseServer
    loop: str | None = None
    on_change: Callable[[dict], None] | None = None  # persists device names as they appear

    @property
    def fuse_dir(self) -> str:
        return os.path.join(self.state_dir, FUSE_SUBDIR)

    def devices(self) -> dict:
        return {"fuse_dir": self.fuse_dir if self.server is not None else None,
                "loop": self.loop,
                "mounted": self.mountpoint if "mount" in self.undo.names() else None}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.devices())

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
        from dmrecover.backends.fuse.server import FuseServer

        fault_point("fuse")
        os.makedirs(self.fuse_dir, exist_ok=True)
        server = FuseServer(self.volume, self.fuse_dir, name=FUSE_FILE)
        server.start()
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
        self.loop = attach_loop(os.path.join(self.fuse_dir, FUSE_FILE))
        self.undo.push("loop", self._detach_loop)
        self._changed()

    def _detach_loop(self) -> None:
        dev, self.loop = self.loop, None
        if dev is not None:
            detach_loop(dev)
        self._changed()

    def _mount(self) -> None:
        fault_point("mount")
        assert self.loop
        mount(self.loop, self.mountpoint, self.fstype, self.mount_options)
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


def teardown_leftovers(state_dir: str, mountpoint: str | None) -> list[str]:
    """Remove the stack a dead session left: returns what was done (for the log).

    The filesystem at MP is unmounted (lazily if a normal unmount fails: on a dead FUSE server
    its I/O errors), the loops backed by files under state_dir are detached, and the FUSE mount
    in state_dir is unmounted (lazily if still busy).
    """
    done = []
    state_dir = os.path.abspath(state_dir)
    fuse_dir = os.path.join(state_dir, FUSE_SUBDIR)
    ours = {dev for dev, _ in loops_backed_under(state_dir)}
    # Mounts of our loops, anywhere (normally just MP), topmost first.
    for m in reversed(mounts()):
        if m.source in ours:
            try:
                umount(m.target, check_holders=False, retries=3)
                done.append(f"unmounted {m.target}")
            except StackError as err:
                log.warning("unmount of %s failed (%s); unmounting lazily", m.target, err)
                umount(m.target, lazy=True)
                done.append(f"lazily unmounted {m.target}")
    del mountpoint  # found through the loops above; MP itself may hold something else
    for dev in sorted(ours):
        try:
            detach_loop(dev)
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
