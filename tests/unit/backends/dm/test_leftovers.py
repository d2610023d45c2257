"""What cleanup finds of dead dm-backend sessions, with dmsetup and sysfs faked (no root)."""

from __future__ import annotations

import pytest

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends.base import Leftover
from dmrecover.backends.dm import DmBackend, leftovers
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.errors import StackError
from tests.unit.backends.conftest import FakeSessions, mount_entry

ROOT = "/var/lib/dmrecover"


def info(name: str, session: str, layer: str, minor: int, open_count: int = 0) -> dm.DmInfo:
    return dm.DmInfo(name=name, uuid=f"{DM_UUID_PREFIX}{session}-{layer}", major=253,
                     minor=minor, open_count=open_count, suspended=False, read_only=False,
                     targets=1)


@pytest.fixture
def system(monkeypatch: pytest.MonkeyPatch):
    """Devices of a live session, a dead one, a finished online cutover (linear on DEST) and
    a session found only by its default state dir."""
    devices = {
        "live-pseudo": (info("live-pseudo", "live", "pseudo", 0), [(7, 0)], "snapshot"),
        "dead-pseudo": (info("dead-pseudo", "dead", "pseudo", 1, open_count=1), [(7, 1)],
                        "snapshot"),
        "dead-merge": (info("dead-merge", "dead", "merge", 2), [(7, 2)], "snapshot-merge"),
        "done-pseudo": (info("done-pseudo", "done", "pseudo", 3, open_count=1), [(8, 16)],
                        "linear"),
        "gone-pseudo": (info("gone-pseudo", "gone", "pseudo", 4), [(8, 32)], "snapshot"),
        # Open once each: the source under the origin under the pseudo-volume.
        "dead-source": (info("dead-source", "dead", "source", 5, open_count=1), [(7, 1)],
                        "multipath"),
        "dead-origin": (info("dead-origin", "dead", "origin", 6, open_count=1), [(7, 1)],
                        "linear"),
    }
    backing = {(7, 0): f"{ROOT}/live/origin/volume", (7, 1): f"{ROOT}/dead/origin/volume",
               (7, 2): f"{ROOT}/dead/cow.img"}
    monkeypatch.setattr(dm, "available", lambda target="snapshot": True)
    monkeypatch.setattr(dm, "list_owned", lambda session=None: [d[0] for d in devices.values()])
    monkeypatch.setattr(dm, "dependencies", lambda name: devices[name][1])
    monkeypatch.setattr(dm, "table", lambda name: f"0 2048 {devices[name][2]} 8:16 0")
    monkeypatch.setattr(dm, "info", lambda name: devices[name][0] if name in devices else None)
    monkeypatch.setattr(leftovers.loops, "backing_file", lambda dev: backing.get(dev))
    monkeypatch.setattr(leftovers, "mounts", lambda: [
        mount_entry("/mnt/live", "/dev/mapper/live-pseudo"),
        mount_entry("/mnt/dead", "/dev/dm-1"),
        mount_entry("/mnt/done", "/dev/mapper/done-pseudo")])
    return FakeSessions({f"{ROOT}/live": (True, "restoring"),
                         f"{ROOT}/dead": (False, "cutting-over"),
                         f"{ROOT}/done": (False, "done")}, root=ROOT)


def test_dead_sessions_devices_and_their_mounts_in_removal_order(system: FakeSessions) -> None:
    found = DmBackend().leftovers(system)
    # A waiting source stops queueing before anything is unmounted; mounts; then devices,
    # the least opened (top layers) first, and among those open once, the pseudo-volume, the
    # origin under it, the source under that (removing the source first once failed: busy).
    assert [(i.kind, i.name) for i in found] == [
        ("queue", "dead-source"), ("mount", "/mnt/dead"),
        ("dm", "dead-merge"), ("dm", "gone-pseudo"), ("dm", "dead-pseudo"),
        ("dm", "dead-origin"), ("dm", "dead-source")]
    assert {i.backend for i in found} == {"dm"}


def test_nothing_where_device_mapper_is_unusable(system: FakeSessions,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "available", lambda target="snapshot": False)
    assert DmBackend().leftovers(system) == []


def test_an_unreadable_dependency_list_falls_back_to_the_default_state_dir(
        system: FakeSessions, monkeypatch: pytest.MonkeyPatch) -> None:
    def deps(name: str) -> list:
        raise StackError("dmsetup deps failed")

    monkeypatch.setattr(dm, "dependencies", deps)
    names = [i.name for i in DmBackend().leftovers(system) if i.kind == "dm"]
    assert "live-pseudo" not in names and "done-pseudo" not in names
    assert set(names) == {"dead-merge", "gone-pseudo", "dead-pseudo", "dead-origin", "dead-source"}


def test_remove_resumes_a_suspended_device_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    suspended = dm.DmInfo("x", DM_UUID_PREFIX + "s-pseudo", 253, 0, 0, True, False, 1)
    monkeypatch.setattr(dm, "info", lambda name: suspended if name == "x" else None)
    monkeypatch.setattr(dm, "resume", lambda name: calls.append(("resume", name)))
    monkeypatch.setattr(dm, "remove", lambda name: calls.append(("remove", name)))
    b = DmBackend()
    b.remove_leftover(Leftover("dm", "dm", "x"))
    b.remove_leftover(Leftover("dm", "dm", "already-gone"))
    assert calls == [("resume", "x"), ("remove", "x")]
    with pytest.raises(ValueError):
        b.remove_leftover(Leftover("dm", "loop", "/dev/loop0"))
