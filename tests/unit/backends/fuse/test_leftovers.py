"""What cleanup finds of dead portable-backend sessions, with the system faked (no root)."""

from __future__ import annotations

import pytest

from dmrecover.backends.base import Leftover
from dmrecover.backends.fuse import FuseBackend, leftovers
from dmrecover.errors import StackError
from dmrecover.system import mounts as system_mounts
from tests.unit.backends.conftest import FakeSessions, mount_entry

LIVE = "/var/lib/dmrecover/live"
DEAD = "/var/lib/dmrecover/dead"


@pytest.fixture
def system(monkeypatch: pytest.MonkeyPatch):
    """Two sessions (one live, one dead), each with its FUSE mount, loop and mount at MP; a
    foreign FUSE mount and a foreign loop; a dead FUSE mount outside any state dir."""
    all_mounts = [
        mount_entry(f"{LIVE}/fuse", "dmrecover", "fuse.dmrecover"),
        mount_entry(f"{DEAD}/fuse", "dmrecover", "fuse.dmrecover"),
        mount_entry("/srv/other", "sshfs", "fuse.sshfs"),
        mount_entry("/tmp/x/fuse", "dmrecover", "fuse.dmrecover"),
        mount_entry("/mnt/live", "/dev/loop0"),
        mount_entry("/mnt/dead", "/dev/loop1"),
        mount_entry("/mnt/dead/sub", "/dev/loop1"),
        mount_entry("/mnt/tmp", "/dev/loop3"),
        mount_entry("/mnt/foreign", "/dev/loop2"),
    ]
    all_loops = [("/dev/loop0", f"{LIVE}/fuse/volume"), ("/dev/loop1", f"{DEAD}/fuse/volume"),
                 ("/dev/loop2", "/images/disk.img"), ("/dev/loop3", "/tmp/x/fuse/volume")]
    dead = {f"{DEAD}/fuse", "/tmp/x/fuse", f"{LIVE}/fuse"}  # statfs: ENOTCONN
    monkeypatch.setattr(leftovers, "mounts", lambda: all_mounts)
    monkeypatch.setattr(leftovers.loops, "loops_backed_under", lambda d: all_loops)
    monkeypatch.setattr(leftovers, "fuse_dead", lambda p: p in dead)
    # An XFS on the dead session's loop and on the live one's: only the dead one's is touched.
    monkeypatch.setattr(leftovers, "xfs_on", lambda dev: dev in ("/dev/loop0", "/dev/loop1"))
    return FakeSessions({LIVE: (True, "restoring"), DEAD: (False, "restoring")})


def test_dead_sessions_leftovers_in_removal_order(system: FakeSessions) -> None:
    found = FuseBackend().leftovers(system)
    assert [(i.kind, i.name) for i in found] == [
        ("xfs", "/dev/loop1"),
        ("mount", "/mnt/tmp"), ("mount", "/mnt/dead/sub"), ("mount", "/mnt/dead"),
        ("loop", "/dev/loop1"), ("loop", "/dev/loop3"),
        ("fuse", f"{DEAD}/fuse"), ("fuse", "/tmp/x/fuse")]
    assert {i.backend for i in found} == {"fuse"}


def test_a_live_session_and_foreign_things_are_left_alone(system: FakeSessions) -> None:
    names = {i.name for i in FuseBackend().leftovers(system)}
    assert not names & {f"{LIVE}/fuse", "/dev/loop0", "/mnt/live", "/srv/other",
                        "/dev/loop2", "/mnt/foreign"}


def test_remove_dispatches_by_kind_and_falls_back_to_lazy(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    calls: list[tuple] = []

    def umount(target: str, **kw: object) -> None:
        calls.append(("umount", target, kw.get("lazy", False)))
        if not kw.get("lazy"):
            raise StackError("busy")

    # the normal-then-lazy unmount is system.mounts.umount_or_detach's: fake what it calls
    monkeypatch.setattr(system_mounts, "umount", umount)
    monkeypatch.setattr(leftovers.loops, "detach", lambda d: calls.append(("detach", d)))
    monkeypatch.setattr(leftovers, "xfs_stop_retrying", lambda d: calls.append(("xfs", d)))
    monkeypatch.setattr(leftovers, "fuse_unmount",
                        lambda p, lazy=False: calls.append(("fusermount", p, lazy)))
    b = FuseBackend()
    b.remove_leftover(Leftover("fuse", "xfs", "/dev/loop1"))
    b.remove_leftover(Leftover("fuse", "mount", "/mnt/dead"))
    b.remove_leftover(Leftover("fuse", "loop", "/dev/loop1"))
    b.remove_leftover(Leftover("fuse", "fuse", "/x/fuse"))
    assert calls == [("xfs", "/dev/loop1"),
                     ("umount", "/mnt/dead", False), ("umount", "/mnt/dead", True),
                     ("detach", "/dev/loop1"), ("fusermount", "/x/fuse", False)]
    with pytest.raises(ValueError):
        b.remove_leftover(Leftover("fuse", "dm", "x"))
