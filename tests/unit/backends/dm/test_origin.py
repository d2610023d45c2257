"""The dm origin's segment table (restored runs on DEST, the rest on FUSE) and its reloads,
with the kernel's dm ioctls modelled (fake_kernel.py, no root); the kernel side is
tests/kernel/test_dm_origin.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dmrecover import DM_UUID_PREFIX
from dmrecover.backends.dm import DmBackend, ioctl, origin
from dmrecover.backends.dm import dmsetup as dm
from dmrecover.backends.dm.origin import OriginReloader, Segment, build_segments, table_lines
from dmrecover.engine.bitmap import Bitmap, SlotFile
from dmrecover.errors import StackError
from tests.unit.backends.conftest import FakeSessions
from tests.unit.backends.dm.fake_kernel import Dev, FakeKernel

CS = 64 << 10  # chunk size in bytes
CSS = CS // 512  # in sectors


def bitmap(n: int, *ranges: tuple[int, int]) -> Bitmap:
    bm = Bitmap(n)
    for first, count in ranges:
        bm.set_range(first, count)
    return bm


def covers(segs: list[Segment], size: int) -> None:
    """Segments are contiguous from 0 to size, alternate DEST/FUSE, none empty."""
    pos = 0
    for a, b in zip(segs, segs[1:], strict=False):
        assert a.on_dest != b.on_dest, segs
    for s in segs:
        assert s.start == pos and s.length > 0, segs
        pos += s.length
    assert pos * 512 == size


def test_nothing_restored_is_one_fuse_segment() -> None:
    segs = build_segments(Bitmap(10), CS, 10 * CS)
    assert segs == [Segment(0, 10 * CSS, False)]


def test_runs_become_dest_segments_coalesced() -> None:
    bm = bitmap(10, (1, 2), (3, 1), (7, 1))  # chunks 1-3 are one run
    segs = build_segments(bm, CS, 10 * CS)
    covers(segs, 10 * CS)
    assert [(s.start // CSS, s.length // CSS, s.on_dest) for s in segs] == [
        (0, 1, False), (1, 3, True), (4, 3, False), (7, 1, True), (8, 2, False)]


def test_table_lines_map_each_segment_at_its_own_offset() -> None:
    segs = build_segments(bitmap(4, (2, 2)), CS, 4 * CS)
    assert table_lines(segs, "/dev/loop9", "/dev/loop8") == [
        f"0 {2 * CSS} linear /dev/loop8 0",
        f"{2 * CSS} {2 * CSS} linear /dev/loop9 {2 * CSS}"]


def test_everything_restored_is_one_linear_on_dest() -> None:
    size = 10 * CS - 3 * 512  # the last chunk is short
    segs = build_segments(bitmap(10, (0, 10)), CS, size)
    assert segs == [Segment(0, size // 512, True)]
    assert table_lines(segs, "D", "F") == [f"0 {size // 512} linear D 0"]


def test_a_short_last_chunk_ends_at_the_volume_size() -> None:
    size = 9 * CS + 4096
    segs = build_segments(bitmap(10, (8, 2)), CS, size)
    covers(segs, size)
    assert segs[-1] == Segment(8 * CSS, (size - 8 * CS) // 512, True)


def test_the_marked_head_stays_on_fuse() -> None:
    segs = build_segments(bitmap(4, (0, 4)), CS, 4 * CS, keep_off=4096)
    assert segs == [Segment(0, 8, False), Segment(8, 4 * CSS - 8, True)]


def test_the_cap_keeps_the_longest_runs() -> None:
    # Runs of 1, 3, 1, 2 chunks at 0, 2, 6, 8 (gaps between): 4 runs need 8-9 segments.
    bm = bitmap(12, (0, 1), (2, 3), (6, 1), (8, 2))
    segs = build_segments(bm, CS, 12 * CS, max_segments=5)
    covers(segs, 12 * CS)
    assert len(segs) <= 5
    assert [(s.start // CSS, s.length // CSS) for s in segs if s.on_dest] == [(2, 3), (8, 2)]
    # One segment allowed: only a volume restored whole is on DEST.
    assert build_segments(bm, CS, 12 * CS, max_segments=1) == [Segment(0, 12 * CSS, False)]
    assert build_segments(bitmap(12, (0, 12)), CS, 12 * CS, max_segments=1) == \
        [Segment(0, 12 * CSS, True)]


def test_the_cap_holds_for_many_islands() -> None:
    bm = bitmap(20000)
    for i in range(0, 20000, 2):
        bm.set(i)
    segs = build_segments(bm, 4096, 20000 * 4096, max_segments=origin.MAX_SEGMENTS)
    covers(segs, 20000 * 4096)
    assert len(segs) <= origin.MAX_SEGMENTS


def test_sizes_not_in_sectors_are_refused() -> None:
    with pytest.raises(StackError, match="multiples of 512"):
        build_segments(Bitmap(1), CS, CS - 1)


# ----------------------------------------------------------------------------- the reloader


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mapfile = SlotFile(tmp_path / "restored.map", 8)
    mapfile.create()
    mapfile.save(Bitmap(8))
    state = {"marked": False, "synced": 0, "busy": False}
    monkeypatch.setattr(ioctl.time, "sleep", lambda s: None)
    fake = FakeKernel(devs={"dmrecover-s-origin": Dev(live=[f"0 {8 * CSS} linear /dev/F 0"],
                                                      read_only=True)}).install(monkeypatch)
    r = OriginReloader("dmrecover-s-origin", map_path=str(tmp_path / "restored.map"), nbits=8,
                       chunk_size=CS, size=8 * CS, dest="/dev/D", fuse="/dev/F",
                       marked=lambda: state["marked"], head=4096,
                       synced=lambda: state["synced"], busy=lambda: state["busy"],
                       interval=0.01)
    yield r, mapfile, state, fake
    r.stop()
    mapfile.close()


def test_reload_follows_the_persisted_map_only(world) -> None:
    r, mapfile, state, fake = world
    assert r.table() == [f"0 {8 * CSS} linear /dev/F 0"]
    assert not r.reload() and fake.calls == []  # nothing changed: no pause at all
    mapfile.save(bitmap(8, (0, 4)))
    assert r.reload()
    # Loaded first (read-only); one resume swaps it in (the kernel suspends, swaps,
    # resumes): no suspend of its own, no udev settle.
    assert fake.ops() == ["load", "resume"]
    assert fake.calls[0][2] & ioctl.DM_READONLY_FLAG
    assert fake.devs[r.name] == Dev(live=[f"0 {4 * CSS} linear /dev/D 0",
                                          f"{4 * CSS} {4 * CSS} linear /dev/F {4 * CSS}"],
                                    read_only=True)
    st = r.stats.as_dict()
    assert st["reloads"] == 1 and st["pause_max"] >= st["pause_mean"] >= 0
    assert st["dest_bytes"] == 4 * CS and st["segments"] == 2


def test_a_failed_load_keeps_the_old_table_and_never_suspends(world) -> None:
    r, mapfile, state, fake = world
    r.table()
    mapfile.save(bitmap(8, (0, 8)))
    fake.fail.add("load")
    assert not r.reload()
    assert fake.ops() == ["load", "status"] and r.stats.failed == 1
    assert not fake.devs[r.name].suspended
    assert r.segments == [Segment(0, 8 * CSS, False)]
    fake.fail.clear()
    assert r.reload() and r.all_dest


def test_a_failed_swap_is_resumed_again(world) -> None:
    """A resume whose table swap fails leaves the device suspended in the kernel: the
    swap resumes it again (on the old table), the reloader keeps the old table."""
    r, mapfile, state, fake = world
    r.table()
    mapfile.save(bitmap(8, (0, 8)))
    fake.fail_once.add("swap")
    assert not r.reload()
    assert fake.ops() == ["load", "resume", "status", "resume", "status"]
    assert r.stats.failed == 1 and not fake.devs[r.name].suspended
    assert r.segments == [Segment(0, 8 * CSS, False)]
    assert fake.devs[r.name].live == [f"0 {8 * CSS} linear /dev/F 0"]
    assert r.reload() and r.all_dest  # tried again: the next load and swap work


def test_busy_puts_the_reload_off(world) -> None:
    r, mapfile, state, fake = world
    r.table()
    mapfile.save(bitmap(8, (0, 8)))
    state["busy"] = True
    assert not r.reload() and fake.calls == [] and r.stats.deferred == 1


def test_the_thread_reloads_after_a_sync_and_stops_once_all_on_dest(world) -> None:
    r, mapfile, state, fake = world
    r.table()
    state["marked"] = True
    r.start()
    mapfile.save(bitmap(8, (0, 8)))
    state["synced"] = 1
    deadline = time.monotonic() + 30
    while r.stats.reloads < 1 and time.monotonic() < deadline:
        r.poke()
        time.sleep(0.02)
    assert r.segments == [Segment(0, 8, False), Segment(8, 8 * CSS - 8, True)]  # head kept
    state["marked"] = False  # DEST's head is back: the table becomes DEST alone
    while not r.all_dest and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.all_dest and r.stats.reloads == 2
    r._thread.join(30)
    assert not r._thread.is_alive(), "no more reloads once the origin is DEST alone"


# ----------------------------------------------------------------------------- leftovers


def test_cleanup_removes_a_dead_sessions_origin_after_its_pseudo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both open once (the pseudo mounted, the origin held by it): the pseudo goes first; a
    done session's origin goes even when its table is one linear (its pseudo stays)."""
    root = "/var/lib/dmrecover"

    def inf(session: str, layer: str, minor: int, open_count: int) -> dm.DmInfo:
        return dm.DmInfo(name=f"{session}-{layer}", uuid=f"{DM_UUID_PREFIX}{session}-{layer}",
                         major=253, minor=minor, open_count=open_count, suspended=False,
                         read_only=layer == "origin", targets=1)

    devs = [inf("dead", "origin", 1, 1), inf("dead", "pseudo", 2, 1),
            inf("done", "origin", 3, 1), inf("done", "pseudo", 4, 1)]
    monkeypatch.setattr(dm, "available", lambda target="snapshot": True)
    monkeypatch.setattr(dm, "list_owned", lambda session=None: devs)
    monkeypatch.setattr(dm, "dependencies", lambda name: [])
    monkeypatch.setattr(dm, "table", lambda name: "0 2048 linear 7:3 0")
    monkeypatch.setattr(dm, "info", lambda name: None)
    sessions = FakeSessions({f"{root}/dead": (False, "restoring"),
                             f"{root}/done": (False, "done")}, root=root)
    names = [i.name for i in DmBackend().leftovers(sessions) if i.kind == "dm"]
    assert names == ["dead-pseudo", "dead-origin", "done-origin"]


def test_the_thread_does_not_run_for_an_origin_already_on_dest(world) -> None:
    """A session resumed after its restore completed: nothing to follow."""
    r, mapfile, state, fake = world
    mapfile.save(bitmap(8, (0, 8)))
    assert r.table() == [f"0 {8 * CSS} linear /dev/D 0"]
    r.start()
    r._thread.join(30)
    assert not r._thread.is_alive() and fake.calls == []


def test_an_origin_that_stays_suspended_is_an_error(world, monkeypatch) -> None:
    """Never a silent failure: a suspended origin holds every read of the pseudo-volume."""
    r, mapfile, state, fake = world
    monkeypatch.setattr(ioctl, "RESUME_ATTEMPTS", 2)
    r.table()
    mapfile.save(bitmap(8, (0, 8)))
    fake.fail.add("resume")
    with pytest.raises(StackError, match="stays suspended"):
        r.reload()
    assert r.stats.failed == 1
