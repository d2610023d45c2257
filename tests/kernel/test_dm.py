"""The dm backend on a real kernel: dmsetup wrapper, UUID prefix, udev names and waits, cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends import registry
from dmrecover.backends.base import BackendContext
from dmrecover.backends.dm import DmBackend
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


def test_merge_reload_in_place(loops, owned_cleanup):
    """snapshot -> snapshot-merge -> linear on the same device, as the online cutover does."""
    session = owned_cleanup
    origin = loops(16 * MiB)
    cow = loops(16 * MiB)
    sh("dd", "if=/dev/urandom", f"of={origin}", "bs=1M", "count=16", "oflag=direct")
    name = dm.dm_name(session, "pseudo")
    path = dm.create(name, dm.snapshot_table(origin, cow, 16 * MiB), dm.dm_uuid(session, "pseudo"))
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=64K", "count=16", "seek=3", "oflag=direct")
    want = sh("sha256sum", str(path)).split()[0]

    dm.suspend(name)
    assert dm.info(name).suspended
    dm.reload(name, dm.snapshot_merge_table(origin, cow, 16 * MiB))
    dm.resume(name)
    assert "snapshot-merge" in dm.table(name)
    deadline = time.monotonic() + 60
    while not dm.snapshot_status(name).merged:
        assert time.monotonic() < deadline, dm.status(name)
        time.sleep(0.2)
    dm.suspend(name)
    dm.reload(name, dm.linear_table(origin, 16 * MiB))
    dm.resume(name)
    assert " linear " in f" {dm.table(name)} "
    assert sh("sha256sum", str(path)).split()[0] == want
    dm.remove(name)
    # The origin alone now holds the merged data.
    assert sh("sha256sum", origin).split()[0] == want


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
