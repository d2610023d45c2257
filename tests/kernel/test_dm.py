"""The dm backend on a real kernel: dmsetup wrapper, UUID prefix, udev names and waits, cleanup."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends import registry
from dmrecover.backends.base import BackendContext
from dmrecover.backends.dm import DmBackend, ioctl
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.errors import StackError
from tests.kernel.kernelutil import foreign_uuid, sh

MiB = 1024 * 1024


def udev_props(dev: str | Path) -> dict[str, str]:
    out = sh("udevadm", "info", "--query=property", f"--name={dev}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_targets_after_probe_include_snapshot_and_merge():
    have = dm.probe()
    assert "snapshot" in have and "snapshot-merge" in have and "linear" in have
    assert all(isinstance(v, tuple) and v for v in have.values())
    assert dm.available("snapshot")
    assert not dm.available("no-such-target")


def test_backend_probe_and_auto_choice():
    DmBackend().probe()  # raises BackendUnavailable naming the missing piece
    # auto prefers dm-clone where the kernel has the clone target (the box builds it)
    assert registry.choose("auto").name == ("dm-clone" if dm.available("clone") else "dm")
    assert registry.choose("dm").kernel_takes_writes


class Sessions:
    """A SessionLookup: the sessions named in `live` run; no state dir holds any file."""

    def __init__(self, root: Path, live: set[str]) -> None:
        self.root = root
        self.live = live

    def state_dir_of(self, path: str) -> str | None:
        return None

    def state_dir_for(self, session: str) -> str:
        return str(self.root / session)

    def is_live(self, state_dir: str) -> bool:
        return os.path.basename(state_dir) in self.live

    def state(self, state_dir: str) -> str | None:
        return None


def test_backend_leftovers_and_teardown_dead(loops, owned_cleanup, tmp_path):
    """A dead session's devices are leftovers (the mount on them first); a live one's are not;
    teardown_dead removes one session's devices and unmounts what is mounted from them."""
    session = owned_cleanup
    backend = DmBackend()
    name = dm.dm_name(session, "pseudo")
    path = dm.create(name, dm.linear_table(loops(32 * MiB), 32 * MiB),
                     dm.dm_uuid(session, "pseudo"))
    sh("mkfs.ext4", "-q", str(path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", str(path), str(mnt))
    try:
        assert not [i for i in backend.leftovers(Sessions(tmp_path, {session}))
                    if i.name == name]
        found = [i for i in backend.leftovers(Sessions(tmp_path, set()))
                 if i.name in (name, str(mnt))]
        assert [(i.kind, i.name) for i in found] == [("mount", str(mnt)), ("dm", name)]
        for item in found:
            backend.remove_leftover(item)
        assert dm.info(name) is None and not os.path.ismount(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

    path = dm.create(name, dm.linear_table(loops(32 * MiB), 32 * MiB),
                     dm.dm_uuid(session, "pseudo"))
    sh("mkfs.ext4", "-q", str(path))
    sh("mount", str(path), str(mnt))
    ctx = BackendContext(session=session, state_dir=str(tmp_path / "state"),
                         engine_dir=str(tmp_path / "state"), mountpoint=str(mnt),
                         fstype="ext4", dest=str(path), size=32 * MiB)
    done = backend.teardown_dead(ctx)
    assert f"unmounted {mnt}" in done and f"removed dm device {name}" in done
    assert dm.info(name) is None and not os.path.ismount(mnt)


def test_snapshot_over_loops(loops, owned_cleanup):
    session = owned_cleanup
    origin = loops(16 * MiB)
    cow = loops(16 * MiB)
    sh("dd", "if=/dev/urandom", f"of={origin}", "bs=1M", "count=16", "oflag=direct")
    before = sh("sha256sum", origin).split()[0]

    # The COW as its own (internal) dm layer, the pseudo-volume as a snapshot over both.
    cow_name = dm.dm_name(session, "cow")
    cow_dev = dm.create(cow_name, dm.linear_table(cow, 16 * MiB), dm.dm_uuid(session, "cow"))
    name = dm.dm_name(session, "pseudo")
    uuid = dm.dm_uuid(session, "pseudo")
    path = dm.create(name, dm.snapshot_table(origin, cow_dev, 16 * MiB), uuid)

    # The node is there as soon as create returns (the udev wait), with our UUID prefix.
    assert path.exists()
    inf = dm.info(name)
    assert inf is not None and inf.uuid == uuid and inf.uuid.startswith(DM_UUID_PREFIX)
    assert inf.owned and not inf.suspended and inf.targets == 1
    assert name in {d.name for d in dm.list_owned(session)}
    assert "snapshot" in dm.table(name)

    # Stable names from the udev rules; the '-' in the session survives the escaping.
    stable = dm.stable_path(session, "pseudo")
    assert stable.resolve() == path.resolve()
    assert dm.stable_path(session, "cow").resolve() == cow_dev.resolve()
    props = udev_props(path)
    assert props.get("DMRECOVER_SESSION") == session and props.get("DMRECOVER_LAYER") == "pseudo"
    assert props.get("UDISKS_IGNORE") == "1"
    assert not props.get("DM_VG_NAME")
    # The internal layer is hidden from systemd, LVM and blkid-driven links.
    cprops = udev_props(cow_dev)
    assert cprops.get("SYSTEMD_READY") == "0"
    assert cprops.get("DM_UDEV_DISABLE_OTHER_RULES_FLAG") == "1"
    assert cprops.get("DM_UDEV_DISABLE_DISK_RULES_FLAG") == "1"

    # Writes land in the COW; the origin is untouched; reads see the write.
    sh("dd", "if=/dev/zero", f"of={path}", "bs=4096", "count=3", "seek=5", "oflag=direct")
    st = dm.snapshot_status(name)
    assert st.allocated > st.metadata and not st.invalid
    assert sh("sha256sum", origin).split()[0] == before
    blk = subprocess.run(["dd", f"if={path}", "bs=4096", "count=1", "skip=6",
                          "iflag=direct"], capture_output=True, check=True).stdout
    assert blk == b"\0" * 4096

    dm.remove(name)
    dm.remove(cow_name)
    assert not path.exists() and not stable.exists()
    assert dm.info(name) is None
    assert not dm.list_owned(session)


def test_swap_snapshot_to_merge_to_linear_in_place(loops, owned_cleanup):
    """snapshot -> snapshot-merge -> linear on the same device through ioctl.swap, as the
    online cutover does: the data stays, the device ends resumed, the pauses are measured."""
    session = owned_cleanup
    origin = loops(16 * MiB)
    cow = loops(16 * MiB)
    sh("dd", "if=/dev/urandom", f"of={origin}", "bs=1M", "count=16", "oflag=direct")
    name = dm.dm_name(session, "pseudo")
    path = dm.create(name, dm.snapshot_table(origin, cow, 16 * MiB), dm.dm_uuid(session, "pseudo"))
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=64K", "count=16", "seek=3", "oflag=direct")
    want = sh("sha256sum", str(path)).split()[0]

    merge = ioctl.swap(name, dm.snapshot_merge_table(origin, cow, 16 * MiB), suspend_first=True)
    st = ioctl.dev_status(name)
    assert st is not None and not st.suspended and not st.inactive_table
    assert [t.type for t in ioctl.table_status(name, table=True)] == ["snapshot-merge"]
    assert merge.pause >= merge.suspend + merge.load and merge.suspend > 0
    deadline = time.monotonic() + 60
    while not dm.snapshot_status(name).merged:
        assert time.monotonic() < deadline, dm.status(name)
        time.sleep(0.2)
    linear = ioctl.swap(name, dm.linear_table(origin, 16 * MiB), suspend_first=False)
    assert linear.suspend == 0 and linear.pause == linear.resume
    assert " linear " in f" {dm.table(name)} "
    assert not ioctl.dev_status(name).suspended
    assert sh("sha256sum", str(path)).split()[0] == want
    print(f"swap pauses: snapshot-merge {merge.pause * 1000:.1f} ms (suspend "
          f"{merge.suspend * 1000:.1f}, load {merge.load * 1000:.1f}, resume "
          f"{merge.resume * 1000:.1f}); linear {linear.pause * 1000:.1f} ms")
    dm.remove(name)
    # The origin alone now holds the merged data.
    assert sh("sha256sum", origin).split()[0] == want


def test_swap_pause_under_a_writer_with_and_without_lockfs(loops, owned_cleanup, tmp_path):
    """What a swap's pause is made of under an fdatasync loop on the mounted snapshot (the
    online cutover's case): the same snapshot table swapped in, loaded first or suspended
    first, with and without the filesystem freeze. Prints the figures; asserts only that I/O
    went on and the device ends resumed."""
    session = owned_cleanup
    origin, cow = loops(64 * MiB), loops(64 * MiB)
    name = dm.dm_name(session, "pseudo")
    table = dm.snapshot_table(origin, cow, 64 * MiB)
    path = dm.create(name, table, dm.dm_uuid(session, "pseudo"))
    sh("mkfs.ext4", "-q", str(path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", str(path), str(mnt))
    stop = threading.Event()
    times: list[float] = []

    def writer() -> None:
        fd = os.open(mnt / "w.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, os.urandom(4096), (i % 256) * 4096)
                os.fdatasync(fd)
                times.append(time.monotonic())
                i += 1
        finally:
            os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        for first in (False, True):
            for lockfs in (False, True):
                pauses = []
                for _ in range(3):
                    n = len(times)
                    done = ioctl.swap(name, table, suspend_first=first, lockfs=lockfs)
                    gap = max((b - a for a, b in zip(times, times[1:], strict=False)
                               if b >= done.start and a <= done.end), default=0.0)
                    pauses.append((done, gap))
                    deadline = time.monotonic() + 30
                    while len(times) < n + 5 and time.monotonic() < deadline:
                        time.sleep(0.01)
                print(f"swap suspend_first={first} lockfs={lockfs}: " + "; ".join(
                    f"pause {d.pause * 1000:.0f} ms (suspend {d.suspend * 1000:.0f}, load "
                    f"{d.load * 1000:.0f}, resume {d.resume * 1000:.0f}), app gap "
                    f"{g * 1000:.0f} ms" for d, g in pauses))
                assert not ioctl.dev_status(name).suspended
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        print(f"writer: {len(times)} fdatasyncs, median gap "
              f"{sorted(gaps)[len(gaps) // 2] * 1000:.1f} ms")
    finally:
        stop.set()
        t.join(30)
        sh("umount", str(mnt))
    assert len(times) > 20


def test_swap_ioctls_agree_with_dmsetup(loops, owned_cleanup):
    """Status and table read by ioctl equal dmsetup's; a table too big for the first buffer
    is read whole (the retry on DM_BUFFER_FULL_FLAG); a read-only load stays read-only."""
    session = owned_cleanup
    a, b = loops(8 * MiB), loops(8 * MiB)
    name = dm.dm_name(session, "origin")
    dm.create(name, dm.linear_table(a, 8 * MiB), dm.dm_uuid(session, "origin"), read_only=True)
    # 1024 alternating segments: ~40 KiB of table, more than the first 16 KiB buffer.
    seg = 8 * MiB // 512 // 1024
    lines = [f"{i * seg} {seg} linear {a if i % 2 else b} {i * seg}" for i in range(1024)]
    ioctl.swap(name, lines, suspend_first=False, read_only=True)
    got = ioctl.table_status(name, table=True)
    assert [t.line() for t in got] == dm.table(name).splitlines()
    assert len(got) == 1024
    st = ioctl.dev_status(name)
    inf = dm.info(name)
    assert st.read_only and inf.read_only and (st.major, st.minor) == (inf.major, inf.minor)
    assert st.open_count == inf.open_count and st.uuid == dm.dm_uuid(session, "origin")
    # (dmsetup prints a linear's empty status with a trailing blank)
    assert [t.line() for t in ioctl.table_status(name)] == [
        ln.rstrip() for ln in dm.status(name).splitlines()]


def test_swap_failures_leave_the_old_table_running(loops, owned_cleanup):
    """A table the kernel refuses, or a swap given up with the table loaded: the old table
    stays live, the device is resumed, no table stays loaded; one clear line."""
    session = owned_cleanup
    a = loops(8 * MiB)
    name = dm.dm_name(session, "pseudo")
    dm.create(name, dm.linear_table(a, 8 * MiB), dm.dm_uuid(session, "pseudo"))
    before = dm.table(name)
    for first in (True, False):
        with pytest.raises(StackError, match="DM_TABLE_LOAD") as err:
            ioctl.swap(name, "0 16384 linear /dev/no-such-device 0", suspend_first=first)
        assert "\n" not in str(err.value) and err.value.hint
        st = ioctl.dev_status(name)
        assert not st.suspended and not st.inactive_table and dm.table(name) == before

    def give_up() -> None:
        raise StackError("given up with the new table loaded")

    with pytest.raises(StackError, match="given up"):
        ioctl.swap(name, dm.linear_table(loops(8 * MiB), 8 * MiB), suspend_first=False,
                   loaded=give_up)
    st = ioctl.dev_status(name)
    assert not st.suspended and not st.inactive_table and dm.table(name) == before
    # I/O goes on after all of it.
    sh("dd", f"if={dm.mapper_path(name)}", "of=/dev/null", "bs=4096", "count=4",
       "iflag=direct")
    assert ioctl.dev_status("dmrecover-no-such-device") is None
    with pytest.raises(StackError, match="ENXIO"):
        ioctl.suspend("dmrecover-no-such-device")


def test_without_udev_sync_nodes_are_polled(loops, owned_cleanup, monkeypatch):
    session = owned_cleanup
    dev = loops(8 * MiB)
    monkeypatch.setattr(dm, "_udevsync", False)
    name = dm.dm_name(session, "origin")
    path = dm.create(name, dm.linear_table(dev, 8 * MiB), dm.dm_uuid(session, "origin"))
    assert path.exists()
    dm.remove(name)
    assert dm.info(name) is None


def test_uuid_without_prefix_refused(loops):
    dev = loops(8 * MiB)
    with pytest.raises(StackError, match="prefix"):
        dm.create("dmrecover-x-origin", dm.linear_table(dev, 8 * MiB), "OTHER-x")
    assert dm.info("dmrecover-x-origin") is None


def test_remove_owned_leaves_foreign_devices(loops, owned_cleanup):
    session = owned_cleanup
    a = loops(8 * MiB)
    b = loops(8 * MiB)
    foreign = f"foreign{os.getpid()}"
    sh("dmsetup", "create", foreign, "--uuid", foreign_uuid(),
       input=f"0 {8 * MiB // 512} linear {b} 0\n".encode())
    try:
        low = dm.dm_name(session, "origin")
        low_path = dm.create(low, dm.linear_table(a, 8 * MiB), dm.dm_uuid(session, "origin"))
        # A stack: a second owned layer on top of the first (removal order matters).
        top = dm.dm_name(session, "pseudo")
        dm.create(top, dm.linear_table(low_path, 8 * MiB), dm.dm_uuid(session, "pseudo"))
        assert dm.info(low).open_count == 1
        removed = dm.remove_owned(session)
        assert removed == [top, low]
        assert dm.info(foreign) is not None
        assert not dm.list_owned(session)
    finally:
        subprocess.run(["dmsetup", "remove", foreign], capture_output=True)


def test_remove_owned_refuses_a_mounted_device(loops, owned_cleanup, tmp_path):
    session = owned_cleanup
    a = loops(32 * MiB)
    name = dm.dm_name(session, "pseudo")
    path = dm.create(name, dm.linear_table(a, 32 * MiB), dm.dm_uuid(session, "pseudo"))
    sh("mkfs.ext4", "-q", str(path))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", str(path), str(mnt))
    try:
        with pytest.raises(StackError, match="in use"):
            dm.remove_owned(session)
        assert dm.info(name) is not None
    finally:
        sh("umount", str(mnt))
    assert dm.remove_owned(session) == [name]
