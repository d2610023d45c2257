"""Helpers shared by the kernel tests (imported by name: tests/kernel is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.session import boot
from dmrecover.system import loops
from dmrecover.system.mounts import umount
from tests.apps.livekit import Sandbox
from tests.helpers.waiting import wait_for


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    """Run a command for a test (the tests' own steps, not dmrecover's)."""
    res = subprocess.run(argv, check=check, capture_output=True, input=input)
    return res.stdout.decode()


def owned_names() -> set[str]:
    return {d.name for d in dm.list_owned()}


def foreign_uuid() -> str:
    u = f"TEST-{uuidlib.uuid4().hex[:12]}"
    assert not u.startswith(DM_UUID_PREFIX)
    return u


def dm_state() -> tuple[str, str]:
    """What `dmsetup ls` and `losetup -a` say (compared before and after a session)."""
    ls = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    lo = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return "\n".join(sorted(ls.splitlines())), "\n".join(sorted(lo.splitlines()))


def detach_loops_under(root: str | os.PathLike[str]) -> list[str]:
    """Detach every loop backed by a file under root; one a device still holds (a dm table, a
    mount) is only marked autoclear and goes when that lets go. Call it before any FUSE mount
    under root is unmounted: a lazily unmounted FUSE file's loop names its backing file
    "/volume", and nothing finds it by its path afterwards."""
    found = [dev for dev, _path in loops.loops_backed_under(root)]
    for dev in found:
        try:
            loops.detach(dev, wait=0)
        except Exception as err:  # keep detaching the others; the fixture's checks report it
            print(f"teardown: detaching {dev}: {err}")
    return found



def teardown_sandbox(sb: Sandbox, before: tuple[str, str]) -> None:
    """Remove all that a live-restore test made, whatever state its sessions are in, and check
    that `dmsetup ls` and `losetup -a` say `before` again (the `box` fixture's end)."""
    # Loops first, while their backing paths still name files under the sandbox: the
    # Sandbox's teardown unmounts lazily, and the loop over a lazily unmounted FUSE origin then
    # names "/volume" as its file, so no lookup by path finds it again. A loop that a dm device
    # still holds is marked autoclear and goes with the device, below.
    detach_loops_under(sb.tmp)
    sb.teardown()
    # dm devices of the sessions (Sandbox.teardown knows mounts and loops only), and their
    # boot units (a test session must not come back at the VM's next boot).
    for sdir in sb.state_root.glob("*"):
        # Only a unit that is enabled (linked in a *.wants dir): `systemctl disable` costs
        # seconds under TCG, and most test sessions never enabled one (set-up failures).
        if list(boot.UNIT_DIR.glob(f"*.wants/{boot.unit_name(sdir.name)}")):
            boot.disable(sdir.name)
        for _ in range(3):
            try:
                dm.remove_owned(sdir.name)
                break
            except Exception:
                time.sleep(0.5)
    sb.teardown()
    assert not sb.mounts_under(), "teardown left mounts"
    assert not sb.loops_under(), "teardown left loops"
    # Autoclear loops go once their last holder has let go: give them a moment.
    wait_for(lambda: dm_state() == before, timeout=15)
    assert dm_state() == before, "dm devices or loops left behind"


@contextmanager
def repository_outage(box: Sandbox) -> Iterator[float]:
    """The sandbox's repository gone for the block (an empty tmpfs mounted over it); yields
    when it went (time.monotonic())."""
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "gone", str(box.repo))
    try:
        yield time.monotonic()
    finally:
        sh("umount", str(box.repo))


class Waiters:
    """Calls that block (reads waiting for a lost repository), each in its own thread: its
    answer, or its failure, kept for the main thread to check."""

    def __init__(self) -> None:
        self.answers: dict[Hashable, object] = {}
        self.failures: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, key: Hashable, call: Callable[..., object], *args: object) -> None:
        def run() -> None:
            try:
                self.answers[key] = call(*args)
            except BaseException as err:  # reported by the main thread
                self.failures.append(err)

        t = threading.Thread(target=run, name=f"waiter {key}", daemon=True)
        t.start()
        self._threads.append(t)

    def join(self, timeout: float) -> None:
        """Wait (timeout seconds in all) until every call has returned; none failed."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0))
        stuck = [t.name for t in self._threads if t.is_alive()]
        assert not stuck, f"still waiting after {timeout:g} s: {stuck}"
        assert not self.failures, self.failures


def ride_out_outage(box: Sandbox, session: str, since: float, *, seconds: float = 30.0,
                    check: Callable[[], None] | None = None) -> None:
    """Poll the session until `seconds` after `since` (one round at least): it keeps restoring
    all along, `check()` (the stack's own state) passes each round, and its status shows the
    wait for the repository at least once."""
    saw_wait = False
    seen: list[str] = []  # what each round saw, for the failure message
    while not seen or time.monotonic() - since < seconds:  # one round at least
        st = box.status(session)
        saw_wait = saw_wait or bool(st.get("waiting_for_repository_since"))
        age = time.time() - (st.get("updated") or 0)
        seen.append(f"{time.monotonic() - since:.0f}s: status {age:.1f}s old, retries "
                    f"{st.get('retries')}, restored {st.get('restored_bytes')}")
        assert st["state"] == "restoring", st
        if check is not None:
            check()
        time.sleep(2)
    assert saw_wait, f"status shows the wait for the repository ({'; '.join(seen)})"


def verify_dest_alone(box: Sandbox, fs_tools, device: str | None = None) -> tuple[int, int]:
    """The end of a session's test: stop the application, unmount, remove the device the
    online cutover left on DEST (when named), then check DEST alone: every backed-up file,
    the seed table, every acknowledged write. Returns (rows, acknowledged writes)."""
    box.stop_app()
    umount(str(box.mnt))
    if device is not None:
        dm.remove(device)
    # DEST's loop (autoclear) goes once the unmount or the removal lets go of it.
    wait_for(lambda: not loops.loop_of(box.dest), timeout=10)
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks, (rows, acks)
    return rows, acks


class KilledSessionWrite:
    """A write made once the session process is dead, in a daemon thread: it may wait for
    the source until `resume` serves it again. `started(within)`: the thread ran for
    `within` s with no error (done, or still waiting); `finished(timeout)`: it completed."""

    def __init__(self, write: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.ok = False

        def run() -> None:
            try:
                write()
                self.ok = True
            except OSError as err:
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def started(self, within: float = 8.0) -> None:
        self.thread.join(within)
        assert self.error is None, f"a write failed while no session served: {self.error}"

    def finished(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        assert self.ok, f"the write of the dead session's time: {self.error or 'still waiting'}"


def source_path_failed(session: str) -> None:
    """The session's waiting source has failed its path: the kernel's reads queue on it."""
    paths = dm.status(dm.dm_name(session, "source")).split()
    assert "F" in paths, f"the source's path has not failed: {paths}"


def kernel_log() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def io_errors_since(log_before: int, *also: str) -> list[str]:
    """Kernel log lines after the first `log_before` naming an I/O error (but on a loop: the
    dead FUSE server's loop fails its reads by design, its source queues them) or one of
    `also`."""
    return [line for line in kernel_log()[log_before:]
            if any(a in line for a in also) or ("I/O error" in line and "dev loop" not in line)]
