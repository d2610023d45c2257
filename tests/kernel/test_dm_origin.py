"""The dm backend's origin on a real kernel: restored chunks are read from DEST by the kernel
and never reach the FUSE origin (the fetcher); unrestored ones do; the origin's table follows
the persisted restored map and ends as one linear on DEST.

"Reached FUSE" is counted where it cannot be missed: the read sectors of the origin's loop
over the FUSE file (/sys/block/loopN/stat); only reads of the pseudo-volume go through it
(the restorer writes DEST directly)."""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

from dmrecover.backends.dm import dmsetup as dm
from dmrecover.system.mounts import mount_at, umount
from tests.apps.livekit import Sandbox
from tests.kernel import test_dm_live_restore as live
from tests.kernel.test_dm_live_restore import SLOW, _read_direct, dm_state

box = live.box  # the live-restore sandbox fixture (leaves no dm device, loop or mount)

MiB = 1 << 20
SECTOR = 512


def _backing(devno: str) -> str:
    p = Path(f"/sys/dev/block/{devno}/loop/backing_file")
    return p.read_text().strip() if p.exists() else ""


def _sysname(devno: str) -> str:
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{devno}"))


def _read_sectors(devno: str) -> int:
    """Sectors read from a block device so far (field 3 of its stat)."""
    return int(Path(f"/sys/block/{_sysname(devno)}/stat").read_text().split()[2])


def _segments(name: str) -> list[tuple[int, int, str]]:
    """(start, length, device major:minor) of each line of a linear table, in sectors."""
    out = []
    for line in dm.table(name).splitlines():
        start, length, target, dev, _off = line.split()
        assert target == "linear", line
        out.append((int(start), int(length), dev))
    return out


def _origin_devices(origin: str, box: Sandbox) -> tuple[str, str]:
    """(FUSE side, DEST loop) of the origin device, as major:minor. The FUSE side is the
    waiting source (backends/dm/waitpath.py) over the loop on the FUSE file: what it reads
    is what FUSE serves. The DEST loop is found by its backing file: the table names it only
    once a run is restored."""
    fuse = dest = ""
    for major, minor in dm.dependencies(origin):
        uuid = Path(f"/sys/dev/block/{major}:{minor}/dm/uuid")
        if uuid.exists() and uuid.read_text().strip().endswith("-source"):
            name = Path(f"/sys/dev/block/{major}:{minor}/dm/name").read_text().strip()
            (lmaj, lmin), = dm.dependencies(name)
            assert _backing(f"{lmaj}:{lmin}").endswith("/origin/volume"), name
            fuse = f"{major}:{minor}"
    for lo in Path("/sys/block").glob("loop*"):
        b = lo / "loop" / "backing_file"
        if b.exists() and b.read_text().strip() == str(box.dest):
            assert (lo / "ro").read_text().strip() == "1", "the origin reads DEST read-only"
            assert not dest, "one loop on DEST"
            dest = (lo / "dev").read_text().strip()
    return fuse, dest


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _read_counted(dev: str, offset: int, length: int, fuse: str, dest: str, cow: str
                  ) -> tuple[int, int, int]:
    """O_DIRECT read of the pseudo-volume; bytes that reached FUSE, that were read from DEST,
    and from the COW (chunks the application wrote are read from there)."""
    before = [_read_sectors(d) for d in (fuse, dest, cow)]
    assert _read_direct(dev, offset, length) == length
    f, d, c = ((_read_sectors(x) - b) * SECTOR for x, b in zip((fuse, dest, cow), before,
                                                               strict=True))
    return f, d, c


def _pauses(box: Sandbox, session: str) -> list[float]:
    """The I/O pause of each origin reload, in seconds (the session log's lines)."""
    text = (box.state_root / session / "session.log").read_text(errors="replace")
    return [float(ms) / 1000 for ms in re.findall(r"I/O paused ([0-9.]+) ms", text)]


def test_dm_origin_serves_restored_chunks_from_dest(box: Sandbox, fs_tools, request) -> None:
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    r = box.live_restore("org", "--backend", "dm", "--cutover", "manual", env=SLOW)
    assert r.returncode == 0, r.stderr
    box.wait_app(timeout=120)
    origin, pseudo = dm.dm_name("org", "origin"), dm.dm_name("org", "pseudo")
    dev = str(dm.mapper_path(pseudo))
    inf = dm.info(origin)
    assert inf is not None and inf.uuid == dm.dm_uuid("org", "origin") and inf.read_only
    # The snapshot reads the origin device, which sits on the FUSE loop and on DEST.
    assert dm.table(pseudo).split()[3] == f"{inf.major}:{inf.minor}"
    fuse, dest = _origin_devices(origin, box)
    assert fuse and dest, dm.dependencies(origin)
    cow = dm.table(pseudo).split()[4]  # "0 <len> snapshot <origin> <cow> P 8"
    size = box.size

    # Part restored: some runs of chunks are on DEST in the table, the restore goes on.
    def dest_run() -> tuple[int, int] | None:
        runs = [(s, n) for s, n, d in _segments(origin) if d == dest and n * SECTOR >= 2 * MiB]
        return max(runs, key=lambda r: r[1]) if runs else None

    start, length = _wait(dest_run, 180, "a restored run of 2 MiB on DEST in the origin")
    st = box.status("org")
    assert st["state"] == "restoring" and st["percent"] < 90, st
    segs = _segments(origin)
    assert sum(n for _, n, _ in segs) * SECTOR == size and segs[0][0] == 0
    assert {d for _, _, d in segs} == {fuse, dest}

    # Restored: read straight from DEST, nothing reaches FUSE (a little slack for the
    # application's own reads during the read).
    off, n = start * SECTOR, min(length * SECTOR, 4 * MiB)
    via_fuse, via_dest, via_cow = _read_counted(dev, off, n, fuse, dest, cow)
    print(f"restored {n >> 10} KiB at {off}: {via_fuse >> 10} KiB via FUSE, "
          f"{via_dest >> 10} KiB via DEST, {via_cow >> 10} KiB via the COW; "
          f"reload pauses so far (s): {_pauses(box, 'org')}")
    assert via_fuse <= n // 16, (via_fuse, n)
    assert via_dest > 0 and via_dest + via_cow >= n - n // 16, (via_dest, via_cow, n)

    # Unrestored (the end of the last FUSE segment long enough for 1 MiB read 256 KiB
    # aligned: a shorter one, a gap between runs fetched on demand near the end of the
    # volume, would put part of the read on DEST): through FUSE, fetched on demand.
    segs = _segments(origin)
    fs_start, fs_len, _ = [s for s in segs if s[2] == fuse and s[1] * SECTOR >= MiB + (256 << 10)
                           ][-1]
    u_off = (fs_start + fs_len) * SECTOR - MiB
    u_off -= u_off % (256 << 10)
    via_fuse, via_dest, via_cow = _read_counted(dev, u_off, MiB, fuse, dest, cow)
    print(f"unrestored 1024 KiB at {u_off}: {via_fuse >> 10} KiB via FUSE, "
          f"{via_dest >> 10} KiB via DEST, {via_cow >> 10} KiB via the COW")
    assert via_fuse > 0 and via_fuse + via_cow >= MiB - MiB // 16, (via_fuse, via_cow, segs)

    # Fetched on demand, then synced: the next reload names it DEST, and it stops reaching
    # FUSE too.
    def on_dest(offset: int) -> bool:
        s = offset // SECTOR
        return any(a <= s < a + n and d == dest for a, n, d in _segments(origin))

    _wait(lambda: on_dest(u_off) and on_dest(u_off + MiB - 1), 120,
          "the chunks fetched on demand on DEST in the origin")
    via_fuse, _, _ = _read_counted(dev, u_off, MiB, fuse, dest, cow)
    assert via_fuse <= MiB // 16, via_fuse

    # Restore complete (manual cutover: the stack stays up): the origin is DEST alone,
    # DEST's head included.
    ready = box.wait_state("org", ("ready", "failed"), timeout=600)
    assert ready["state"] == "ready", ready.get("error")
    _wait(lambda: len(_segments(origin)) == 1, 60, "the origin as one linear on DEST")
    assert _segments(origin) == [(0, size // SECTOR, dest)]
    via_fuse, via_dest, via_cow = _read_counted(dev, 0, MiB, fuse, dest, cow)
    assert via_fuse <= MiB // 16 and via_dest > 0, (via_fuse, via_dest)
    assert via_dest + via_cow >= MiB - MiB // 16, (via_dest, via_cow)

    pauses = _pauses(box, "org")
    assert len(pauses) >= 2, pauses
    assert max(pauses) < 5, pauses
    print(f"origin reloads: {len(pauses)}, I/O pause max {max(pauses) * 1000:.1f} ms, "
          f"mean {statistics.mean(pauses) * 1000:.1f} ms")

    # The restart cutover still works with the origin device; nothing of it is left.
    r = box.cli("cutover", "org")
    assert r.returncode == 0, r.stdout + r.stderr
    done = box.wait_state("org", ("done", "failed"), timeout=600)
    assert done["state"] == "done", done.get("error")
    assert not dm.list_owned("org")
    # One loop on DEST is left: the one DEST is mounted from (the origin's went with it).
    assert len([ln for ln in dm_state()[1].splitlines() if f"({box.dest})" in ln]) == 1
    box.wait_app(timeout=120)
    box.stop_app()
    umount(str(box.mnt))
    rows, acks = box.verify_dest(fs_tools)
    assert acks > 10 and rows >= acks


def test_dm_origin_setup_failure_leaves_nothing(box: Sandbox, fs_tools, request) -> None:
    """A failure injected at the origin device's step: nothing is left (no dm device, no
    loop on DEST, no FUSE mount), as for the other steps (test_dm_live_restore)."""
    box.prepare(fs_tools, request.getfixturevalue("ext4_image"))
    before = dm_state()
    r = box.live_restore("fo", "--backend", "dm", env={"DMRECOVER_FAIL_AT": "dm-origin"})
    assert r.returncode != 0
    assert "injected failure at step dm-origin" in r.stderr, r.stderr
    assert box.session("fo")["state"] == "failed"
    assert mount_at(str(box.mnt)) is None
    assert not box.loops_under()
    assert dm_state() == before
    assert not dm.list_owned("fo")
